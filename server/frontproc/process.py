"""One frontend process: ``python -m shoal.server.frontproc --index I --run-dir D --prefix
SHM_PREFIX --http-port P --grpc-port G [--triton] -- <the server's own arguments>``.

It parses the server's command line as the router did (same limits, restrictions, header
forwarding, TLS), listens on the public HTTP and gRPC ports beside the other frontend
processes (SO_REUSEPORT), answers inference requests through the router's worker channel
(``link``) and forwards everything else to the router (``proxy``). It stops when the router
says ``Shutdown``, closes its connection, or on SIGTERM / SIGINT: it stops accepting, lets
its requests finish (``--exit-timeout-secs``), and exits."""

from __future__ import annotations

# ruff: noqa: E402 - grpc's environment is set before the imports that load grpc
from shoal.server import grpcenv

grpcenv.apply()  # before grpc is imported (the router set the same already)

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, cast

import grpc
from aiohttp import web

from shoal.proto import wire
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server import resources, restrict
from shoal.server.app import STREAM_GRACE_S, _listen
from shoal.server.busypoll import BUSY
from shoal.server.config import ServerConfig, parse
from shoal.server.frontends.grpc import app as grpc_app
from shoal.server.frontends.grpc import stream
from shoal.server.frontends.grpc.service import InferenceService, rpc
from shoal.server.frontends.http import body, fastpath, routes
from shoal.server.frontends.http import generate as generate_ext
from shoal.server.frontends.http.app import GUARD, make_runner, middleware
from shoal.server.frontends.http.body import HttpLimits
from shoal.server.frontends.http.connections import ConnectionGuard, GuardedSite
from shoal.server.frontproc.lanes_client import Lanes
from shoal.server.frontproc.link import RemoteDataPlane, RouterLink
from shoal.server.frontproc.proxy import GrpcProxy, HttpProxy
from shoal.server.frontproc.shmregions import ShmRegions
from shoal.server.frontproc.supervisor import arena_prefix
from shoal.server.headerforward import HeaderForwarder
from shoal.server.logsettings import LogSettings
from shoal.server.peers import PeerCache
from shoal.server.resources import RequestBudget
from shoal.server.tracing import Trace
from shoal.server.types import UseProxy
from shoal.shm.arena import Arena

log = logging.getLogger("shoal.frontend")

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
PROXY: web.AppKey[HttpProxy] = web.AppKey("proxy", HttpProxy)


async def http_infer(request: web.Request) -> web.StreamResponse:
    """``routes.infer`` with the router's answer over the worker channel."""
    app = request.app
    limits = app[routes.LIMITS]
    held = await body.read(request, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s, budget=limits.budget)
    try:
        try:
            return await routes.infer_body(request, cast(Any, app[routes.DATAPLANE]), held.data)
        except UseProxy:
            return await app[PROXY].forward(request, app[GUARD].peer(request), body=bytes(held.data))
    finally:
        held.release()


async def http_generate(request: web.Request) -> web.StreamResponse:
    """``/generate`` and ``/generate_stream`` (``frontends.http.generate``, the router's code)
    of a model version published on lanes: its configuration came with the route, and its
    responses come from its worker (a decoupled one's over the lane, ``Lanes.stream``); another
    model's go through the router, whose answer is relayed."""
    app = request.app
    limits = app[routes.LIMITS]
    held = await body.read(request, limit=limits.max_json_bytes, timeout_s=limits.body_timeout_s, budget=limits.budget)
    try:
        data = bytes(held.data)
    finally:
        held.release()
    dp: Any = app[routes.DATAPLANE]
    model, version = request.match_info["model"], routes.version_of(request)
    try:
        if request.path.endswith("_stream"):
            return await generate_ext.generate_stream(request, dp, model, version, data)
        return await generate_ext.generate(request, dp, model, version, data)
    except UseProxy:  # raised before anything was sent
        return await app[PROXY].forward(request, app[GUARD].peer(request), body=data)


async def http_forward(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].forward(request, request.app[GUARD].peer(request))


routes.CATEGORY[http_infer] = "inference"
routes.CATEGORY[http_generate] = "inference"


def http_app(cfg: ServerConfig, link: RouterLink, limits: resources.Budget, run_dir: str) -> web.Application:
    http_limits = HttpLimits(
        max_body_bytes=cfg.http_max_body_bytes,
        max_json_bytes=cfg.http_max_input_bytes,
        body_timeout_s=cfg.http_body_timeout_s,
        budget=RequestBudget(limits.max_buffered_request_bytes),
    )
    restrictions, _ = restrict.parse(cfg.http_restricted_api, flag="--http-restricted-api", what="api")
    guard = ConnectionGuard(limits.http_max_connections)
    # forwarded bodies are the router's to limit (it applies the same limits)
    app = web.Application(middlewares=[middleware], client_max_size=max(cfg.http_max_input_bytes, 1 << 20))
    app[routes.DATAPLANE] = cast(Any, RemoteDataPlane(link, "http"))
    app[routes.LIMITS] = http_limits
    app[routes.RESTRICTIONS] = restrictions
    app[GUARD] = guard
    app[routes.PEER] = guard.peer
    forward = HeaderForwarder(cfg.http_header_forward_pattern)
    if forward:
        app[routes.FORWARD] = forward
    app[PROXY] = HttpProxy(os.path.join(run_dir, "http.sock"))
    app.router.add_post("/v2/models/{model}/infer", http_infer)
    app.router.add_post("/v2/models/{model}/versions/{version:[0-9]+}/infer", http_infer)
    for ext in ("generate", "generate_stream"):
        app.router.add_post(f"/v2/models/{{model}}/{ext}", http_generate)
        app.router.add_post(f"/v2/models/{{model}}/versions/{{version:[0-9]+}}/{ext}", http_generate)
    app.router.add_route("*", "/{tail:.*}", http_forward)
    return app


class FrontendInference(InferenceService):
    """``ModelInfer`` and ``ModelStreamInfer`` as the router's own service answers them, over
    the worker channel (the same code: ``stream.model_stream_infer`` with ``RemoteDataPlane``)."""

    def __init__(self, proxy: GrpcProxy, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy = proxy

    @rpc("inference")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await self.infer_message(request, context)
        except UseProxy:
            raw = await self.proxy.unary(MODEL_INFER, request.SerializeToString(), context)
            return pb.ModelInferResponse.FromString(raw) if raw is not None else None  # type: ignore[return-value]

    async def stream_request(
        self,
        request: pb.ModelInferRequest,
        context: Any,
        put: Callable[[stream.Entry], None],
        trace: Trace | None = None,
    ) -> None:
        """One request of a client's stream, through the router; one that the router must
        trace goes on a ``ModelStreamInfer`` stream of its own to the router's gRPC server,
        whose responses are relayed into the client's stream."""
        try:
            await stream.stream_request(self, request, context, put, trace)
            return
        except UseProxy:
            pass  # raised before any response
        unwritten = asyncio.Semaphore(stream.UNWRITTEN)
        last = False
        async with aclosing(self.proxy.relay(MODEL_STREAM_INFER, request.SerializeToString(), context)) as raws:
            async for raw in raws:
                msg = pb.ModelStreamInferResponse.FromString(raw)
                final = msg.infer_response.parameters.get(stream.FINAL_PARAMETER)
                last = final is not None and final.bool_param
                await unwritten.acquire()
                put((msg, last, unwritten.release))
        if not last:  # the router's stream ended without its final response: the request is done
            put((None, True, None))


async def start_grpc(
    cfg: ServerConfig, link: RouterLink, limits: resources.Budget, run_dir: str, port: int
) -> tuple[grpc.aio.Server, GrpcProxy]:
    # every frontend process listens on the port (SO_REUSEPORT)
    server = grpc_app.make_server(replace(cfg.grpc, reuse_port=True), max_connections=limits.grpc_max_connections)
    peers = PeerCache(port)
    proxy = GrpcProxy("unix:" + os.path.join(run_dir, "grpc.sock"), peers)
    rules, _ = restrict.parse(
        cfg.grpc_restricted_protocol,
        flag="--grpc-restricted-protocol",
        what="protocol",
        header_prefix=restrict.GRPC_HEADER_PREFIX,
    )
    inference = FrontendInference(
        proxy,
        cast(Any, RemoteDataPlane(link, "grpc")),
        restrictions=rules,
        peers=peers,
        stream_max_pending=cfg.grpc_stream_max_pending,
        budget=RequestBudget(limits.max_buffered_request_bytes),
        forward=HeaderForwarder(cfg.grpc.header_forward_pattern),
    )
    native = grpc_app.service_handler(inference, only=("ModelInfer", "ModelStreamInfer"))
    server.add_generic_rpc_handlers((native, proxy))
    grpc_app.bind(server, cfg.grpc_host or cfg.host, port, cfg.grpc.tls)
    await server.start()
    return server, proxy


async def serve(cfg: ServerConfig, index: int, run_dir: str, prefix: str, http_port: int, grpc_port: int) -> int:
    BUSY.configure(cfg.busy_poll_us)
    arena = Arena(
        arena_prefix(prefix, index, os.getpid()), segment_bytes=cfg.shm_arena_bytes, max_bytes=cfg.shm_arena_max_bytes
    )
    link = await RouterLink.connect(
        os.path.join(run_dir, "workers.sock"), f"frontend/{index}".encode(), arena, cfg.inline_max_bytes
    )
    if cfg.frontend_lanes:
        link.lanes = Lanes(
            index,
            link.place,
            link.free_blocks,
            link.mapper,
            link.report,
            ShmRegions(link.send, any_owner=cfg.client_shm_access == "any"),
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limits = resources.budget(cfg)
    runner: web.AppRunner | None = None
    grpc_server: grpc.aio.Server | None = None
    proxies: list[Any] = []
    try:
        if http_port:
            app = http_app(cfg, link, limits, run_dir)
            proxies.append(app[PROXY])
            runner = make_runner(
                app, exit_timeout_s=cfg.exit_timeout_s, keepalive_timeout_s=cfg.http_keepalive_timeout_s
            )
            await runner.setup()
            sock = _listen(cfg.host, http_port, reuse_port=True)
            fast = fastpath.handler_factory(app, app[GUARD])
            await GuardedSite(runner, sock, app[GUARD], backlog=1024, handler=fast).start()
        if grpc_port:
            grpc_server, gproxy = await start_grpc(cfg, link, limits, run_dir, grpc_port)
            proxies.append(gproxy)
        ready = wire.envelope(0)
        ready.ready.pid = os.getpid()
        link.send(ready)
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, link.shutdown, link.closed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    finally:
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
        if grpc_server is not None:
            # no new calls; those running get --exit-timeout-secs, or a short grace once the
            # router says that every inference it accepted is answered
            gstop = asyncio.ensure_future(grpc_server.stop(0 if link.closed.is_set() else cfg.exit_timeout_s))
            waits = [asyncio.ensure_future(e.wait()) for e in (link.finish, link.closed)]
            await asyncio.wait([gstop, *waits], return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if not gstop.done() and link.lanes is not None and not link.closed.is_set():
                # the router answered what it accepted; this process's own lane requests
                # still run on the workers (which stop after this process): wait for them
                idle = asyncio.ensure_future(link.lanes.idle.wait())
                await asyncio.wait([gstop, idle], return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()
            if not gstop.done():
                await grpc_server.stop(STREAM_GRACE_S)
                await gstop
        if runner is not None:
            await runner.cleanup()
        for p in proxies:
            await p.close()
        if link.transport is not None:
            link.transport.close()
        link.mapper.close()
        arena.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shoal-frontend")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--prefix", required=True, help="the server's shared-memory prefix")
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--triton", action="store_true")
    ap.add_argument("server_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    cfg = parse(server_args, triton=args.triton)
    logging.basicConfig(stream=sys.stderr)
    LogSettings(  # the router's levels and format, as its command line set them
        verbose=cfg.log.verbose,
        info=cfg.log.info,
        warning=cfg.log.warning,
        error=cfg.log.error,
        log_format=cfg.log.format,
    )
    from shoal.server.__main__ import _run

    return _run(serve(cfg, args.index, args.run_dir, args.prefix, args.http_port, args.grpc_port))
