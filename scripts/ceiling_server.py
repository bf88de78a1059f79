#!/usr/bin/env python3
"""The "Python ceiling": the least a single-process aiohttp server must do to serve an
identity model over the KServe v2 HTTP protocol, as far as perf_analyzer needs it.

Endpoints: health (live/ready), server metadata (no "statistics" extension, so
perf_analyzer does not ask for statistics), model metadata/config/ready and infer.
Infer parses the JSON header, takes INPUT0 (binary tensor extension or JSON "data"),
and returns it as OUTPUT0: binary unless the request asked for JSON output.

With ``--grpc-port`` it also serves the same over gRPC (grpc.aio, the generated messages,
one handler per call perf_analyzer makes): the minimal grpc.aio server that gRPC numbers are
compared with.

With ``--hop`` each infer also sends INPUT0's bytes over a Unix socket to an echo process and
waits for them to come back before it answers: the least a server that runs its models in
another process (Shoal's router and worker) must add to a request, one round trip between
two processes with no work in either.

Usage: python scripts/ceiling_server.py [--host 127.0.0.1] [--port 0] [--model identity] [--grpc-port 0] [--hop]
       [--grpc-own-defaults]

gRPC runs with the settings Shoal's server sets for itself (``server/grpcenv.py``: grpc's
EventEngine listener off) unless ``--grpc-own-defaults`` is given.

With --port 0 it binds any free port. Once bound it prints ``LISTENING <port>`` (and
``GRPC listening on <host>:<port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import socket
import subprocess
import sys
from typing import Any

import numpy as np
from aiohttp import web

try:  # the same fast JSON codec a real server would pick, when available
    import rapidjson as json_codec
except ImportError:  # pragma: no cover
    import json as json_codec  # type: ignore[no-redef]

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME, OUTPUT_NAME = "INPUT0", "OUTPUT0"

MODEL_NAME = web.AppKey("model_name", str)

ECHO = """
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    data = s.recv(1 << 20)
    if not data:
        break
    s.sendall(data)
"""


class Hop(asyncio.Protocol):
    """A round trip to an echo process over a Unix socket pair; replies come back in order."""

    def __init__(self) -> None:
        self.waiting: collections.deque[tuple[asyncio.Future[bytes], int]] = collections.deque()
        self.buf = bytearray()
        self.transport: Any = None
        self.child: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.child = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self, mine)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.waiting and len(self.buf) >= self.waiting[0][1]:
            fut, n = self.waiting.popleft()
            chunk = bytes(self.buf[:n])
            del self.buf[:n]
            if not fut.done():
                fut.set_result(chunk)

    async def echo(self, data: bytes) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, len(data)))
        self.transport.write(data)
        return await fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.child is not None:
            self.child.wait(5)


HOP: list[Hop] = []
"""The hop when ``--hop`` is given."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _check_model(request: web.Request) -> web.Response | None:
    name = request.match_info["model"]
    if name != request.app[MODEL_NAME]:
        return _error(404, f"Request for unknown model: '{name}' is not found")
    version = request.match_info.get("version")
    if version not in (None, "", "1"):
        return _error(404, f"Request for unknown model: '{name}' version {version} is not found")
    return None


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "ceiling", "version": "0.0.0", "extensions": []})


async def model_metadata(request: web.Request) -> web.Response:
    if (err := _check_model(request)) is not None:
        return err
    return web.json_response(
        {
            "name": request.app[MODEL_NAME],
            "versions": ["1"],
            "platform": "python",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
        }
    )


async def model_config(request: web.Request) -> web.Response:
    if (err := _check_model(request)) is not None:
        return err
    return web.json_response(
        {
            "name": request.app[MODEL_NAME],
            "backend": "python",
            "max_batch_size": 0,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [-1]}],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    return err if (err := _check_model(request)) is not None else web.Response(status=200)


def _wants_binary(header: dict[str, Any], input_was_binary: bool) -> bool:
    """Binary output if the request says so (per output or request-wide), else follow
    the input's form."""
    for out in header.get("outputs") or ():
        if out.get("name") == OUTPUT_NAME:
            flag = (out.get("parameters") or {}).get("binary_data")
            if flag is not None:
                return bool(flag)
    flag = (header.get("parameters") or {}).get("binary_data_output")
    return bool(flag) if flag is not None else input_was_binary


async def infer(request: web.Request) -> web.Response:
    if (err := _check_model(request)) is not None:
        return err
    body = await request.read()
    header_len_str = request.headers.get(HEADER_LENGTH)
    header_len = int(header_len_str) if header_len_str is not None else len(body)
    if not 0 <= header_len <= len(body):
        return _error(400, f"invalid {HEADER_LENGTH}: {header_len_str}")
    try:
        header = json_codec.loads(body[:header_len])
    except ValueError as exc:
        return _error(400, f"failed to parse the request JSON: {exc}")

    # Locate INPUT0; binary inputs are laid out back to back after the JSON header.
    offset = header_len
    data: bytes | None = None
    shape: list[int] = []
    binary_input = False
    for inp in header.get("inputs") or ():
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if inp.get("name") != INPUT_NAME:
            offset += int(size or 0)
            continue
        if inp.get("datatype") != "FP32":
            return _error(400, f"input '{INPUT_NAME}' must be FP32, got {inp.get('datatype')}")
        shape = [int(d) for d in inp.get("shape", ())]
        count = int(np.prod(shape, dtype=np.int64))
        if size is not None:
            binary_input = True
            if int(size) != 4 * count or offset + int(size) > len(body):
                return _error(400, f"input '{INPUT_NAME}': bad binary_data_size {size}")
            # The copy any real server makes: request body -> the model's input tensor.
            data = body[offset : offset + int(size)]
        else:
            arr = np.asarray(inp.get("data", ()), dtype=np.float32)
            if arr.size != count:
                return _error(400, f"input '{INPUT_NAME}': {arr.size} values for shape {shape}")
            data = arr.tobytes()
        break
    if data is None:
        return _error(400, f"missing input '{INPUT_NAME}'")
    if HOP:
        data = await HOP[0].echo(data)

    response: dict[str, Any] = {"model_name": request.app[MODEL_NAME], "model_version": "1"}
    if "id" in header:
        response["id"] = header["id"]
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": shape}
    response["outputs"] = [output]

    if not _wants_binary(header, binary_input):
        output["data"] = np.frombuffer(data, dtype=np.float32).tolist()
        return web.Response(body=json_codec.dumps(response), content_type="application/json")

    output["parameters"] = {"binary_data_size": len(data)}
    json_bytes = json_codec.dumps(response).encode()
    return web.Response(
        body=b"".join((json_bytes, data)),
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(json_bytes))},
    )


def make_app(model_name: str) -> web.Application:
    app = web.Application(client_max_size=1 << 31)
    app[MODEL_NAME] = model_name
    add = app.router.add_route
    add("GET", "/v2/health/live", health)
    add("GET", "/v2/health/ready", health)
    add("GET", "/v2", server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        add("GET", prefix, model_metadata)
        add("GET", prefix + "/config", model_config)
        add("GET", prefix + "/ready", model_ready)
        add("POST", prefix + "/infer", infer)
    return app


async def start_grpc(host: str, port: int, model_name: str) -> Any:
    """The gRPC ceiling: ModelInfer returns INPUT0 as OUTPUT0; the metadata calls answer
    what perf_analyzer asks."""
    import grpc

    from shoal.proto.gen import grpc_service_pb2 as pb
    from shoal.proto.gen import model_config_pb2 as mc

    async def server_live(req: Any, ctx: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(req: Any, ctx: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def model_ready(req: Any, ctx: Any) -> Any:
        return pb.ModelReadyResponse(ready=req.name == model_name)

    async def server_metadata(req: Any, ctx: Any) -> Any:
        return pb.ServerMetadataResponse(name="ceiling", version="0.0.0")

    def _tensor(cls: Any, name: str) -> Any:
        return cls(name=name, datatype="FP32", shape=[-1])

    async def model_metadata(req: Any, ctx: Any) -> Any:
        return pb.ModelMetadataResponse(
            name=model_name,
            versions=["1"],
            platform="python",
            inputs=[_tensor(pb.ModelMetadataResponse.TensorMetadata, INPUT_NAME)],
            outputs=[_tensor(pb.ModelMetadataResponse.TensorMetadata, OUTPUT_NAME)],
        )

    async def model_config(req: Any, ctx: Any) -> Any:
        cfg = mc.ModelConfig(name=model_name, backend="python", max_batch_size=0)
        cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[-1])
        cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[-1])
        return pb.ModelConfigResponse(config=cfg)

    async def model_infer(req: Any, ctx: Any) -> Any:
        if req.model_name != model_name or len(req.inputs) != 1 or len(req.raw_input_contents) != 1:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "one raw FP32 input INPUT0 expected")
        t = req.inputs[0]
        resp = pb.ModelInferResponse(model_name=model_name, model_version="1", id=req.id)
        resp.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=t.shape)
        data = req.raw_input_contents[0]
        resp.raw_output_contents.append(await HOP[0].echo(data) if HOP else data)
        return resp

    calls = {
        "ServerLive": (server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": (model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelInfer": (model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
        for name, (fn, req, resp) in calls.items()
    }
    server = grpc.aio.server(options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"GRPC listening on {host}:{bound}", flush=True)
    return server


async def serve(app: web.Application, sock: socket.socket, grpc_port: int | None = None, hop: bool = False) -> None:
    runner = web.AppRunner(app, access_log=None)  # no per-request logging in a ceiling
    await runner.setup()
    grpc_server = None
    if hop:
        HOP.append(Hop())
        await HOP[0].start()
    try:
        if grpc_port is not None:
            grpc_server = await start_grpc(sock.getsockname()[0], grpc_port, app[MODEL_NAME])
        await web.SockSite(runner, sock).start()
        print(f"LISTENING {sock.getsockname()[1]}", flush=True)  # bound *and* listening
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(0)
        await runner.cleanup()
        for h in HOP:
            h.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--model", default="identity", help="the identity model's name")
    parser.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC here (0 = any free port)")
    parser.add_argument("--hop", action="store_true", help="each infer makes a round trip to an echo process")
    parser.add_argument("--grpc-own-defaults", action="store_true",
                        help="grpc's own settings, not the ones Shoal sets (server/grpcenv.py)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.grpc_own_defaults:  # like Shoal (before grpc is imported), so the ratio compares like with like
        from shoal.server import grpcenv

        grpcenv.apply()

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    # The same event loop Shoal runs on (uvloop when installed), so the ratio compares
    # servers, not loops.
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(make_app(args.model), sock, args.grpc_port, args.hop))
    else:
        uvloop.run(serve(make_app(args.model), sock, args.grpc_port, args.hop))


if __name__ == "__main__":
    main()
