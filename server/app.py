"""``App``: the composition root. Builds every router component and owns start/stop order."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from shoal.proto import stopmark, wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.server import gpus, grpcenv, repository, resources, restrict, tracing
from shoal.server.bls import BlsRouter
from shoal.server.busypoll import BUSY
from shoal.server.cloudrepo import RemoteRepository
from shoal.server.config import ServerConfig
from shoal.server.custommetrics import CustomMetrics
from shoal.server.dataplane import DataPlane
from shoal.server.dispatch import output
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.pool import DispatchContext
from shoal.server.dispatch.ratelimit import RateLimiter
from shoal.server.frontends.grpc.app import GrpcBindError, start_grpc
from shoal.server.frontends.http import fastpath
from shoal.server.frontends.http.app import make_app, make_health_app, make_runner
from shoal.server.frontends.http.body import HttpLimits
from shoal.server.frontends.http.connections import ConnectionGuard, GuardedSite
from shoal.server.frontproc.lanes import LaneTable
from shoal.server.frontproc.shmmirror import ShmMirror
from shoal.server.frontproc.supervisor import Frontends, hold_port
from shoal.server.headerforward import HeaderForwarder
from shoal.server.logsettings import LogSettings
from shoal.server.memory import Trimmer
from shoal.server.metrics import CONTENT_TYPE, Metrics, Sampler
from shoal.server.models import InstanceSettings, ModelManager
from shoal.server.repositories import Repositories
from shoal.server.resources import RequestBudget
from shoal.server.responsecache import ResponseCache
from shoal.server.rundir import RunDir, reclaim_run_dirs
from shoal.server.sharedmem import Region, SharedMemoryRegistry
from shoal.server.status import StatusMonitor
from shoal.server.tracing import TraceManager
from shoal.shm import region
from shoal.shm.arena import Arena
from shoal.shm.mapper import Mapper

log = logging.getLogger("shoal")
PROBE_TIMEOUT_S = 30.0
STREAM_GRACE_S = 1.0
METRICS_MAX_CONNECTIONS = 64


def server_version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return "0.1.0"


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.prefix = f"{region.SERVER_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        self.run_dir = ""
        self._run: RunDir | None = None
        self.http_port = 0
        self._runner: web.AppRunner | None = None
        self.arena: Arena | None = None
        self.custom_metrics: CustomMetrics | None = None
        self.bls: BlsRouter | None = None
        self.mapper = Mapper()
        self.channel: WorkerChannel | None = None
        self.models: ModelManager | None = None
        self.dataplane: DataPlane | None = None
        self._force = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self.grpc_port = 0
        self._poll: asyncio.Future[None] | None = None
        self.remote: RemoteRepository | None = None
        self.metrics: Metrics | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._health_runner: web.AppRunner | None = None
        self.trimmer = Trimmer()
        self.budget: resources.Budget | None = None
        self.http_guard: ConnectionGuard | None = None
        self.tracer: TraceManager | None = None
        self.status: StatusMonitor | None = None
        self.frontends: Frontends | None = None
        self.lanes: LaneTable | None = None
        """What frontend processes may send straight to workers (``--frontend-lanes``)."""
        self._held: list[socket.socket] = []
        """Public ports kept for the frontend processes."""

    async def _refresh_remote(self) -> None:
        if self.remote is not None:
            await asyncio.to_thread(self.remote.sync)

    def _forget_regions(self, region_ids: Sequence[int]) -> None:
        if self.models is not None:
            for worker in self.models.registry.workers():
                worker.forget(region_ids)

    async def _probe_region(self, region: Region) -> None:
        workers = [w for w in self.models.registry.workers() if w.ready] if self.models is not None else []
        if not workers:
            return
        worker = min(workers, key=lambda w: w.outstanding)
        env = wire.envelope(0)
        region.descriptor(0, 0, env.probe.region)
        try:
            reply, _ = await asyncio.wait_for(worker.submit(env, []), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise ServingError(
                f"{worker.label} did not open the CUDA shared memory region within {PROBE_TIMEOUT_S:.0f} s",
                code=ErrorCode.UNAVAILABLE,
            ) from None
        if reply.WhichOneof("body") == "failed":
            raise wire.to_error(reply.failed)

    async def _start_metrics(self) -> None:
        cfg = self.config
        assert self.models is not None
        sampler = Sampler(cpu=cfg.allow_cpu_metrics, gpu=cfg.allow_gpu_metrics, gpu_devices=gpus.devices())
        self.metrics = Metrics(
            self.models,
            sampler,
            cfg.metrics_interval_ms / 1000,
            self.custom_metrics,
            cache_on=cfg.cache_bytes > 0,
            latency=cfg.latency_metrics,
        )
        metrics = self.metrics

        async def scrape(_: web.Request) -> web.Response:
            if self.lanes is not None:
                await self.lanes.settle()  # lane requests answered so far are counted
            return web.Response(body=metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._metrics_runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=cfg.http_keepalive_timeout_s
        )
        await self._metrics_runner.setup()
        host = cfg.metrics_address or cfg.host
        sock = _listen(host, cfg.metrics_port, what="Metrics", flag="--metrics-port")
        # scrapers are few: a small bound keeps the port from costing descriptors
        await GuardedSite(self._metrics_runner, sock, ConnectionGuard(METRICS_MAX_CONNECTIONS), backlog=128).start()
        metrics.start()
        log.info("Metrics listening on %s:%d", host, sock.getsockname()[1])

    def stopping(self) -> None:
        """The server is about to stop (a signal came): from now on a worker that exits is
        not replaced. Called from the signal's callback, ahead of ``stop``, so that a worker
        the same signal reached (a process group's SIGTERM) is not restarted in between."""
        if self.models is not None:
            self.models.server_stopping()
        if self.run_dir:
            stopmark.mark(self.run_dir)  # workers that got the same SIGTERM go on serving

    def force_stop(self) -> None:
        """Make a running ``stop`` skip its waits (a second signal)."""
        self._force.set()

    async def _bounded(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait({task, force}, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def start(self) -> None:
        cfg = self.config
        BUSY.configure(cfg.busy_poll_us)
        # the log settings apply first, so that every line of the start (the reclaim warnings
        # below included) has the chosen format and goes where --log-file says
        logs = LogSettings(
            verbose=cfg.log.verbose,
            log_file=cfg.log.file,
            info=cfg.log.info,
            warning=cfg.log.warning,
            error=cfg.log.error,
            log_format=cfg.log.format,
        )
        try:
            self.tracer = TraceManager(tracing.parse_options(cfg.trace_config))
        except tracing.TraceConfigError as exc:
            raise StartupError(str(exc)) from None
        try:
            self._run = RunDir.create(self.prefix)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise StartupError(f"cannot make the run folder: {exc.strerror or exc}{where}") from None
        self.run_dir = str(self._run.path)
        stale = region.reclaim_stale()
        if stale:
            log.warning("removed %d shared-memory segments left by a server that is gone", len(stale))
        old_dirs = reclaim_run_dirs()
        if old_dirs:
            log.warning("removed %d run directories left by a server that is gone", len(old_dirs))
        self.arena = Arena(f"{self.prefix}_in", segment_bytes=cfg.shm_arena_bytes, max_bytes=cfg.shm_arena_max_bytes)
        self.channel = WorkerChannel(f"ipc://{self.run_dir}/workers.sock")
        self.channel.start()
        limits = resources.budget(cfg)
        self.budget = limits
        shm = SharedMemoryRegistry(
            allowed=cfg.allow_client_shm,
            gpu_count=gpus.count,
            access=cfg.client_shm_access,
            key_prefixes=cfg.client_shm_key_prefixes,
            max_regions=cfg.client_shm_max_regions,
            max_regions_per_client=cfg.client_shm_max_regions_per_client,
        )
        ctx = DispatchContext(
            arena=self.arena,
            mapper=self.mapper,
            inline_max_bytes=cfg.inline_max_bytes,
            shm=shm,
            limiter=RateLimiter(cfg.rate_limit_resources) if cfg.rate_limit == "execution_count" else None,
        )
        settings = InstanceSettings(
            run_prefix=self.prefix,
            worker_arena_bytes=cfg.worker_arena_bytes,
            inline_max_bytes=cfg.inline_max_bytes,
            log_verbose=cfg.log.verbose,
            backend_config=cfg.backend_config,
            host_policies=cfg.host_policies,
            gpu_load_limits=cfg.gpu_load_limits,
            load_timeout_s=cfg.model_load_timeout_s,
            gpu_devices=tuple(gpus.devices()),
            heartbeat_timeout_s=cfg.worker_heartbeat_timeout_s,
            # a server-side deadline makes a batch unanswered for twice as long a stuck backend
            stall_timeout_s=2 * cfg.request_timeout_s,
            max_workers=limits.max_worker_processes,
            python=cfg.worker_python,
            client_shm_mapped=cfg.client_shm_mapped,
            lanes=cfg.frontend_lanes,
            busy_poll_us=cfg.busy_poll_us,
        )
        roots = (cfg.model_repository, *cfg.more_repositories)
        if cfg.model_repository_url:
            self.remote = RemoteRepository(cfg.model_repository_url, Path(self.run_dir) / "repository")
            await asyncio.to_thread(self.remote.sync)
            roots = (self.remote.cache,)
        repository.use_config_name(cfg.model_config_name)
        if cfg.model_namespacing:
            log.warning("--model-namespacing=true is not supported: a model name must be unique across repositories")
        self.models = ModelManager(
            Repositories(roots, upload_root=Path(self.run_dir) / "uploads"),
            load_threads=cfg.model_load_thread_count,
            latency=cfg.latency_metrics,
            load_retries=cfg.model_load_retry_count,
            channel=self.channel,
            ctx=ctx,
            settings=settings,
            mode=cfg.model_control_mode,
            drain_timeout_s=cfg.exit_timeout_s,
            auto_complete=not (cfg.strict_model_config or cfg.disable_auto_complete),
            refresh=self._refresh_remote if self.remote is not None else None,
        )
        shm.on_forget = self._forget_regions
        shm.prober = self._probe_region
        self.dataplane = dataplane = DataPlane(
            self.models,
            tracer=self.tracer,
            version=server_version(),
            strict_readiness=cfg.strict_readiness,
            server_id=cfg.server_id,
            shm=shm,
            logs=logs,
            allow_admin=cfg.allow_admin_api,
            request_timeout_s=cfg.request_timeout_s,
            cache=ResponseCache(cfg.cache_bytes) if cfg.cache_bytes > 0 else None,
        )
        self.bls = BlsRouter(dataplane, self.channel, self.mapper, ctx.cuda_segments)
        self.custom_metrics = CustomMetrics(self.channel, self.models.registry)
        http_restrictions, _ = restrict.parse(cfg.http_restricted_api, flag="--http-restricted-api", what="api")
        grpc_restrictions, _ = restrict.parse(
            cfg.grpc_restricted_protocol,
            flag="--grpc-restricted-protocol",
            what="protocol",
            header_prefix=restrict.GRPC_HEADER_PREFIX,
        )
        self.status = StatusMonitor(self.models)
        self.http_guard = ConnectionGuard(limits.http_max_connections)
        http_limits = HttpLimits(
            max_body_bytes=cfg.http_max_body_bytes,
            max_json_bytes=cfg.http_max_input_bytes,
            body_timeout_s=cfg.http_body_timeout_s,
            budget=RequestBudget(limits.max_buffered_request_bytes),
        )
        app = make_app(
            self.dataplane,
            http_limits,
            restrictions=http_restrictions,
            guard=self.http_guard,
            forward=HeaderForwarder(cfg.http_header_forward_pattern),
            status=self.status,
        )
        self._runner = make_runner(
            app, exit_timeout_s=cfg.exit_timeout_s, keepalive_timeout_s=cfg.http_keepalive_timeout_s
        )
        await self._runner.setup()
        if cfg.allow_http and cfg.frontend_processes:
            self.http_port = self._hold(cfg.host, cfg.http_port, "HTTP", "--http-port")
            await web.UnixSite(self._runner, os.path.join(self.run_dir, "http.sock")).start()
        elif cfg.allow_http:
            sock = _listen(cfg.host, cfg.http_port, reuse_port=cfg.reuse_http_port, what="HTTP", flag="--http-port")
            self.http_port = sock.getsockname()[1]
            fast = fastpath.handler_factory(app, self.http_guard)
            await GuardedSite(self._runner, sock, self.http_guard, backlog=1024, handler=fast).start()
            log.info("HTTP listening on %s:%d", cfg.host, self.http_port)
        if cfg.http_health_port >= 0:
            await self._start_health()
        if cfg.allow_grpc:
            grpc_host = cfg.grpc_host or cfg.host
            if cfg.frontend_processes:
                self.grpc_port = self._hold(grpc_host, cfg.grpc_port, "gRPC", "--grpc-port")
            try:
                self._grpc, bound = await start_grpc(
                    self.dataplane,
                    "unix:" + os.path.join(self.run_dir, "grpc.sock") if cfg.frontend_processes else grpc_host,
                    cfg.grpc_port,
                    cfg.grpc,
                    max_connections=limits.grpc_max_connections,
                    stream_max_pending=cfg.grpc_stream_max_pending,
                    restrictions=grpc_restrictions,
                    budget=http_limits.budget,
                )
            except GrpcBindError as exc:
                # grpc does not say why: a plain bind of the same address does
                why = _probe(exc.host, exc.port)
                raise ListenError(_bind_problem("gRPC", grpc_host, cfg.grpc_port, "--grpc-port", why)) from None
            if not cfg.frontend_processes:
                self.grpc_port = bound
                log.info("GRPC listening on %s:%d", grpc_host, self.grpc_port)
            if grpcenv.EXPERIMENTS in grpcenv.SET:
                log.info(
                    "gRPC runs with %s=%s (Shoal's default: grpc's older listener, one thread hop less a call; "
                    "set %s to choose, empty for grpc's own defaults)",
                    grpcenv.EXPERIMENTS,
                    grpcenv.SET[grpcenv.EXPERIMENTS],
                    grpcenv.EXPERIMENTS,
                )
        if cfg.frontend_processes:
            await self._start_frontends()
        elif cfg.frontend_lanes:  # workers' BLS calls use lanes too
            self.lanes = LaneTable(self.dataplane, self.channel, [])
            self.dataplane.settle = self.lanes.settle
            self.lanes.start()
        if cfg.allow_metrics:
            await self._start_metrics()
        if cfg.model_control_mode == "explicit":
            # --load-model NAME (repeatable; * = every model); none: start with nothing
            if "*" in cfg.load_models:
                await self.models.load_all()
            elif cfg.load_models:
                await self.models.load_all(list(dict.fromkeys(cfg.load_models)))
        else:
            await self.models.load_all()
        if cfg.model_control_mode == "poll":
            self._poll = asyncio.ensure_future(self.models.poll_forever(cfg.repository_poll_s))
        self.trimmer.start()
        self.status.start()
        self.dataplane.started = True
        ready = self.models.registry.all_ready()
        log.info("server %s: %s", "ready" if ready else "started, NOT ready", self.models.registry.summary())
        if cfg.exit_on_error and not ready:
            raise StartupError("failed to load all models")

    def _hold(self, host: str, port: int, what: str, flag: str) -> int:
        """Keep ``port`` for the frontend processes; returns it (the one chosen, for 0)."""
        try:
            sock = hold_port(host, port)
        except OSError as exc:
            raise ListenError(_bind_problem(what, host, port, flag, exc)) from exc
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def _frontend_gone(self, arena_prefix: str) -> None:
        """A frontend process exited: its input arena goes (workers and the router drop their
        mappings of it)."""
        self.mapper.forget_prefix(arena_prefix)
        if self.models is not None:
            for worker in self.models.registry.workers():
                worker.forget(arena_prefixes=[arena_prefix])
        region.unlink_prefix(arena_prefix + "_")

    async def _start_frontends(self) -> None:
        cfg = self.config
        assert self.channel is not None
        self.frontends = Frontends(
            cfg.frontend_processes,
            self.channel,
            self.run_dir,
            self.prefix,
            cfg.argv,
            triton=cfg.triton,
            on_exit=self._frontend_gone,
            http_port=self.http_port if cfg.allow_http else 0,
            grpc_port=self.grpc_port if cfg.allow_grpc else 0,
        )
        if self.models is not None:
            self.models.arena_gone.append(self.frontends.forget_arena)
        if self.dataplane is not None and cfg.frontend_lanes:
            self.lanes = LaneTable(self.dataplane, self.channel, self.frontends.identities)
            self.frontends.on_ready.append(self.lanes.send)
            mirror = self.dataplane.shm_mirror = ShmMirror(self.dataplane.shm, self.channel, self.frontends.identities)
            self.frontends.on_ready.append(mirror.send)
            self.dataplane.settle = self.lanes.settle
            self.lanes.start()
        try:
            await self.frontends.start()
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        if cfg.allow_http:
            log.info("HTTP listening on %s:%d", cfg.host, self.http_port)
        if cfg.allow_grpc:
            log.info("GRPC listening on %s:%d", cfg.grpc_host or cfg.host, self.grpc_port)
        log.info("%d frontend processes serve the HTTP and gRPC ports", cfg.frontend_processes)

    async def _start_health(self) -> None:
        assert self.dataplane is not None
        self._health_runner = web.AppRunner(
            make_health_app(self.dataplane), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._health_runner.setup()
        sock = _listen(self.config.host, self.config.http_health_port, what="HTTP health", flag="--http-health-port")
        await GuardedSite(self._health_runner, sock, ConnectionGuard(METRICS_MAX_CONNECTIONS), backlog=128).start()
        log.info("HTTP health listening on %s:%d", self.config.host, sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded by --exit-timeout-secs),
        stop workers, remove every shared-memory segment and the run directory."""
        timeout = self.config.exit_timeout_s
        deadline = time.monotonic() + timeout
        self.stopping()
        if self.dataplane is not None:
            self.dataplane.accepting = False
        if self.lanes is not None:
            self.lanes.refresh()  # no more requests skip the router
            await self.lanes.stop()
        if self.frontends is not None:
            self.frontends.begin_stop()
        if self._poll is not None:
            self._poll.cancel()
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        # grpc's stop() refuses new RPCs at once and cancels those still running after the grace
        grpc_stop = asyncio.ensure_future(self._grpc.stop(timeout)) if self._grpc is not None else None
        if self.models is not None:
            await self._bounded(self.models.drain(timeout))
        if self.frontends is not None:  # their answers are written; then they exit
            # streams they forward end with the router's own (the short grace below)
            router_grpc = (
                asyncio.ensure_future(self._grpc.stop(0 if self._force.is_set() else STREAM_GRACE_S))
                if self._grpc is not None
                else None
            )
            await self.frontends.wait_stopped(0.5 if self._force.is_set() else max(1.0, deadline - time.monotonic()))
            if router_grpc is not None:
                await router_grpc
        for sock in self._held:
            sock.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._health_runner is not None:
            await self._health_runner.cleanup()
        if self.metrics is not None:
            await self.metrics.stop()
        await self.trimmer.stop()
        if self.status is not None:
            await self.status.stop()
        if self._runner is not None:
            await self._bounded(self._runner.cleanup())
        if grpc_stop is not None and self._grpc is not None:
            # Every accepted inference has finished (or the drain timed out); what is left
            # are idle streams and answers being written: a short grace, not the full one.
            await self._grpc.stop(0 if self._force.is_set() else STREAM_GRACE_S)
            await grpc_stop
        if self.tracer is not None:
            self.tracer.close()  # the frontends are done: every trace is written
        if self.models is not None:
            # Idle workers finalize their models and exit at once; a worker still busy after
            # --exit-timeout-secs gets a short grace period, then SIGKILL.
            grace = 0.0 if self._force.is_set() else max(2.0, deadline - time.monotonic())
            await self.models.stop(grace)
        if self.bls is not None:
            self.bls.close()
        if self.channel is not None:
            self.channel.close()
        self.mapper.close()
        if self.arena is not None:
            self.arena.close()
        region.unlink_prefix(self.prefix + "_")
        if self._run is not None:
            self._run.close()
        # the workers' last lines, forwarded by a thread, before the router's last one
        await asyncio.to_thread(output.FORWARDER.flush)
        log.info("server stopped")


class StartupError(Exception):
    """The server cannot serve as asked (``--exit-on-error`` and a model failed to load)."""


class ListenError(StartupError):
    """A port cannot be listened on; the message names the port and its flag."""


def _bind_problem(what: str, host: str, port: int, flag: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{what} port {port} is in use ({flag})"
    if exc.errno == errno.EACCES:
        return f"{what} port {port} needs privileges this process does not have ({flag})"
    return f"cannot listen on {host}:{port} for {what} ({flag}): {exc.strerror or exc}"


def _probe(host: str, port: int) -> OSError:
    """Why grpc could not bind ``host``:``port``: what a plain bind says."""
    try:
        _listen(host, port).close()
    except OSError as found:
        return found
    return OSError(errno.EADDRNOTAVAIL, "grpc could not bind the address")


def _listen(host: str, port: int, *, reuse_port: bool = False, what: str = "", flag: str = "") -> socket.socket:
    """A listening TCP socket; binding it ourselves is how the port chosen for 0 is known.
    ``reuse_port``: several servers may listen on the port (the kernel spreads connections).
    A failure raises ``ListenError`` naming ``what`` and its ``flag`` (the ``OSError`` as
    its cause); without ``what``, the ``OSError`` itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if not what:
            raise
        raise ListenError(_bind_problem(what, host, port, flag, exc)) from exc
    return sock
