"""``DataPlane``: the one API the frontends call. Transport-neutral: it takes and returns
``server.types`` values and plain dicts, and raises ``ServingError``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.config_json import config_to_json
from shoal.proto.errors import DeadlineExceeded, ErrorCode, InvalidInput, ServingError, Unsupported
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.busypoll import BUSY
from shoal.server.classification import classify
from shoal.server.logsettings import LogSettings
from shoal.server.models import ModelManager, ModelVersion, submit
from shoal.server.models.loadparams import load_parameters, unload_parameters
from shoal.server.peers import Peer
from shoal.server.responsecache import ResponseCache, cacheable
from shoal.server.responsecache import key as cache_key
from shoal.server.sharedmem import Region, SharedMemoryRegistry
from shoal.server.streaming import StreamItem, responses
from shoal.server.tracing import NewSetting, TraceManager
from shoal.server.types import InferRequest, InferResult
from shoal.server.validation import validate

if TYPE_CHECKING:
    from shoal.server.frontproc.shmmirror import ShmMirror

log = logging.getLogger("shoal.dataplane")

SERVER_NAME = "shoal"
HTTP_DECOUPLED_ERROR = T.HTTP_DECOUPLED
GRPC_DECOUPLED_ERROR = T.GRPC_DECOUPLED
EXTENSIONS = [
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]
"""The Triton extensions that work here, in Triton's order."""


class DataPlane:
    def __init__(
        self,
        models: ModelManager,
        *,
        version: str,
        strict_readiness: bool = True,
        logs: LogSettings,
        shm: SharedMemoryRegistry,
        allow_admin: bool = False,
        request_timeout_s: float = 0.0,
        server_id: str = SERVER_NAME,
        cache: ResponseCache | None = None,
        tracer: TraceManager | None = None,
    ) -> None:
        self.tracer = tracer or TraceManager()
        """Trace settings and sampling (``server.tracing``); frontends test ``tracer.active``."""
        self.server_id = server_id
        """The name server metadata reports (``--id``)."""
        self.cache = cache
        """The response cache (``--cache-config``); models opt in with ``response_cache``."""
        self.models = models
        self.registry = models.registry
        self.request_timeout_s = request_timeout_s
        """Deadline of every request (0: none); a request's ``timeout`` parameter may shorten it."""
        self.allow_admin = allow_admin
        """Operators may restart workers through the admin API."""
        self.shm = shm
        """The client shared-memory regions; the dispatcher uses the same one."""
        self.shm_mirror: ShmMirror | None = None
        """The frontend processes' copies of the regions (lanes), when there are some."""
        self.logs = logs
        self.version = version
        self.strict_readiness = strict_readiness
        self.accepting = True
        self.started = False
        self.settle: Callable[[], Awaitable[None]] | None = None
        """Awaited before statistics are read: requests served elsewhere are counted by then
        (``frontproc.lanes``)."""
        self.changed: list[Callable[[], None]] = []
        """Called when settings that decide how requests are served change (tracing)."""

    # ---- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not (self.started and self.accepting):
            return False
        return self.registry.all_ready() if self.strict_readiness else True

    async def server_ready(self) -> bool:
        """``ready``, and with strict readiness every ready model's own readiness checks
        too (as Triton's strict readiness asks each instance)."""
        if not self.ready():
            return False
        if self.strict_readiness:
            for mv in self.registry.ready_versions():
                if mv.pool is not None and any(w.has_ready_check for w in mv.pool.workers):
                    if not await self.model_ready(mv.name, mv.version):
                        return False
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_id, "version": self.version, "extensions": list(EXTENSIONS)}

    async def model_ready(self, name: str, version: int) -> bool:
        """Whether the version is ready: its instances run, and each model instance's own
        readiness check (python_backend's ``is_ready``) says so; raises the lookup error of
        an unknown, unavailable or unready version."""
        mv = self.registry.get(name, version)
        workers = [w for w in mv.pool.workers if w.has_ready_check] if mv.pool is not None else []
        if not workers:
            return True
        answers = await asyncio.gather(*(w.check_ready() for w in workers))
        for w, (ready, why) in zip(workers, answers, strict=True):
            if not ready:
                why = why or f"{w.label}: is_ready() returned False"
                log.debug("model %r version %d is not ready: %s", mv.name, mv.version, why)
                return False
        return True

    def model_metadata(self, name: str, version: int) -> dict[str, Any]:
        mv = self.registry.get(name, version)
        cfg = mv.config
        if version >= 0:
            versions = [str(version)]
        else:
            versions = [str(m.version) for m in self.registry.ready_versions(name)]
        batch = [-1] if cfg.max_batch_size > 0 else []
        return {
            "name": name,
            "versions": versions,
            "platform": cfg.platform or cfg.backend,
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in mv.inputs.values()
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in mv.outputs.values()
            ],
        }

    def model_config(self, name: str, version: int) -> dict[str, Any]:
        return config_to_json(self.registry.get(name, version).config)

    def model_config_message(self, name: str, version: int) -> mc.ModelConfig:
        """The normalized configuration; callers must not modify it."""
        return self.registry.get(name, version).config

    def raw_input(self, name: str, version: int, nbytes: int) -> tuple[str, str, tuple[int, ...]]:
        """Name, datatype and shape of the one input a raw-body request feeds (Triton's
        errors; such a request has no id)."""
        mv = self.registry.get(name, version)
        if len(mv.inputs) != 1:
            raise T.RAW_INPUT_COUNT(count=len(mv.inputs), model=name)
        spec = next(iter(mv.inputs.values()))
        batch: tuple[int, ...] = (1,) if mv.config.max_batch_size > 0 else ()
        variable = [i for i, d in enumerate(spec.dims) if d == -1]
        if len(variable) > 1:
            raise T.RAW_INPUT_VARIABLE_DIMS(name=spec.name)
        if spec.datatype == "BYTES":
            if spec.dims != (1,):
                raise T.RAW_INPUT_BYTES_SHAPE(name=spec.name)
            return spec.name, "BYTES", batch + (1,)
        itemsize = dtypes.BY_PROTOCOL[spec.datatype].itemsize
        fixed = dtypes.element_count([d for d in spec.dims if d != -1]) * itemsize
        dims = list(spec.dims)
        if variable:
            if fixed == 0 or nbytes % fixed:
                raise InvalidInput(f"raw binary request body of {nbytes} bytes does not fit input '{spec.name}'")
            dims[variable[0]] = nbytes // fixed
        return spec.name, spec.datatype, batch + tuple(dims)

    # ---- model repository extension -------------------------------------------------------------

    def _check_control(self) -> None:
        if self.models.mode != "explicit":
            raise T.CONTROL_DISABLED()

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.models.index(ready_only)

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Load or reload ``name``; ``parameters["config"]``: JSON text of a configuration
        to use instead of config.pbtxt; ``"file:<path>"``: model files (bytes; base64 text
        over HTTP), read from a directory of their own instead of the repository's, as
        Triton's temporary model directory (``config`` is then required)."""
        self._check_control()
        override, files = load_parameters(name, parameters)
        if self.models.refresh is not None:
            await self.models.refresh()
        upload = None
        if files:
            try:
                upload = await asyncio.to_thread(self.models.repos.write_upload, name, files)
            except ValueError as exc:
                raise T.LOAD_FILE_ESCAPES(name=f"file:{str(exc)[:256]}") from None
            except OSError as exc:
                log.warning("load of '%s': writing its files failed: %s", name, exc.strerror)
                raise ServingError(T.LOAD_POLL_FAILED.text(model=name), code=ErrorCode.INTERNAL) from None
        await self.models.load(name, override, upload=upload)

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Unload ``name``; with ``unload_dependents`` also the ensembles using it and, for
        an ensemble, its composing models (``ModelManager.unload``)."""
        self._check_control()
        dependents = unload_parameters(parameters)
        await self.models.unload(name, dependents)

    # ---- shared-memory extensions (the registry decides who may do what) ----------------------

    def shm_status(self, name: str | None, *, cuda: bool, peer: Peer | None) -> list[Region]:
        return self.shm.status(name, cuda=cuda, peer=peer)

    def register_system_shm(
        self, name: str, key: Any, offset: Any, byte_size: Any, peer: Peer | None, *, trusted: bool
    ) -> None:
        region = self.shm.register_system(name, key, offset, byte_size, peer, trusted=trusted)
        if self.shm_mirror is not None:
            self.shm_mirror.added(region)

    async def register_cuda_shm(
        self, name: str, raw_handle: Any, device_id: Any, byte_size: Any, peer: Peer | None, *, trusted: bool
    ) -> None:
        region = await self.shm.register_cuda_checked(name, raw_handle, device_id, byte_size, peer, trusted=trusted)
        if self.shm_mirror is not None:
            self.shm_mirror.added(region)

    async def unregister_shm(self, name: str | None, *, cuda: bool, peer: Peer | None) -> None:
        """Answered once no frontend process takes new requests naming the regions."""
        removed = self.shm.unregister(name, cuda=cuda, peer=peer)
        if removed and self.shm_mirror is not None:
            await self.shm_mirror.dropped(removed)

    # ---- logging extension --------------------------------------------------------------------

    def log_settings(self) -> dict[str, Any]:
        return self.logs.as_dict()

    def update_log_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.logs.update(changes) if changes else self.logs.as_dict()

    # ---- trace extension ----------------------------------------------------------------------

    def trace_settings(self, model: str, changes: NewSetting | None = None) -> TraceManager:
        """Apply ``changes`` to the global (``model`` "") or a model's trace setting; the
        caller reads the settings now in effect from the returned manager (``view``)."""
        if model:
            try:
                self.registry.get(model, -1)
            except ServingError:
                raise T.TRACE_UNKNOWN_MODEL(model=model) from None
        if changes is not None and not changes.empty():
            self.tracer.update(model, changes)
            for hook in self.changed:
                hook()
        return self.tracer

    async def change_trace_settings(self, model: str, changes: NewSetting | None) -> TraceManager:
        """``trace_settings`` with ``changes``, returned once every frontend process has the
        lane routes the change made (tracing on: none), so that the caller's next request
        cannot reach a worker over a lane untraced (``changed`` pushes the routes; ``settle``
        answers after the frontends read them, their messages being read in order)."""
        tracer = self.trace_settings(model, changes)
        if changes is not None and not changes.empty() and self.settle is not None:
            await self.settle()
        return tracer

    # ---- admin: worker processes (Shoal's own API) ---------------------------------------------

    def workers(self) -> list[dict[str, object]]:
        return self.registry.instances()

    def worker_logs(self, name: str, instance: str, version: int, limit: int = 0) -> list[dict[str, object]]:
        """The last lines (``limit``: at most that many) written by the processes of one
        instance, of every loaded version of ``name`` or of ``version``."""
        versions = self.registry.models.get(name)
        if not versions:
            raise ServingError(f"model '{name}' is not loaded", code=ErrorCode.NOT_FOUND)
        out: list[dict[str, object]] = []
        for v, mv in sorted(versions.items()):
            if version >= 0 and v != version:
                continue
            for w in mv.pool.workers if mv.pool is not None else ():
                if w.spec.instance_name == instance:
                    lines = w.logs.as_list(limit)
                    out.append({"model": name, "version": str(v), "instance": instance, "pid": w.pid, "lines": lines})
        if not out:
            where = f"version {version} of model '{name}'" if version >= 0 else f"model '{name}'"
            raise ServingError(f"{where} has no instance '{instance}'", code=ErrorCode.NOT_FOUND)
        return out

    async def restart_worker(self, name: str, instance: str, version: int) -> list[dict[str, object]]:
        if not self.allow_admin:
            raise ServingError(
                "restarting workers is not allowed: start the server with --allow-admin-api=true",
                code=ErrorCode.UNAVAILABLE,
            )
        return await self.models.restart_instance(name, instance, version)

    # ---- statistics ---------------------------------------------------------------------------

    async def settled_statistics(self, name: str, version: int) -> list[dict[str, Any]]:
        """``statistics`` once requests answered elsewhere so far are counted."""
        if self.settle is not None:
            await self.settle()
        return self.statistics(name, version)

    def statistics(self, name: str, version: int) -> list[dict[str, Any]]:
        """Statistics of every READY version (of one model, or of one version)."""
        if not name:
            return [mv.stats.as_dict() for mv in self.registry.ready_versions()]
        versions = self.registry.ready_versions(name)
        if not versions:
            raise T.STATS_MODEL_UNAVAILABLE(model=name)
        if version >= 0:
            versions = [mv for mv in versions if mv.version == version]
            if not versions:
                raise T.STATS_VERSION_UNAVAILABLE(model=name)
        return [mv.stats.as_dict() for mv in versions]

    # ---- inference ----------------------------------------------------------------------------

    def _deadline_s(self, mv: ModelVersion, request: InferRequest) -> float:
        """Seconds ``request`` may take (0: no deadline): the server's ``--request-timeout-secs``,
        shortened by the request's ``timeout`` parameter (microseconds) unless the model's
        dynamic-batcher queue policy reads that parameter itself (Triton's meaning there)."""
        deadline = self.request_timeout_s
        timeout_us = request.parameters.get("timeout")
        if timeout_us is not None and not _queue_policy_reads_timeout(mv.config):
            if type(timeout_us) is not int or timeout_us < 0:
                raise InvalidInput("request parameter 'timeout' must be a non-negative integer")
            if timeout_us:
                deadline = min(deadline, timeout_us / 1e6) if deadline else timeout_us / 1e6
        return deadline

    async def infer(
        self, request: InferRequest, *, decoupled_error: T.ErrorText | str = HTTP_DECOUPLED_ERROR
    ) -> InferResult:
        """One request, one result. A decoupled model's requests go through ``infer_stream``:
        here they fail with ``decoupled_error`` (Triton's text for the calling endpoint)."""
        BUSY.kick()
        if not self.accepting:
            raise ServingError("the server is shutting down", code=ErrorCode.UNAVAILABLE)
        mv = self.registry.get(request.model_name, request.model_version)
        if mv.decoupled:
            raise Unsupported(decoupled_error) if isinstance(decoupled_error, str) else decoupled_error()
        return await self._infer(mv, request)

    def is_decoupled(self, name: str, version: int) -> bool:
        """The model version a request names uses the decoupled transaction policy (False
        when it cannot serve: the request then fails with the lookup's error)."""
        try:
            return self.registry.get(name, version).decoupled
        except ServingError:
            return False

    def infer_stream(self, request: InferRequest) -> AsyncGenerator[StreamItem, None]:
        """A decoupled model's responses to one request, as they come: ``(response, final)``
        pairs, where a response is an ``InferResult`` (the caller ``done``s it), a
        ``ServingError`` or ``None`` (the final flag alone). Ends after the final one. A
        request refused before it ran raises. Leaving the loop early stops delivery: later
        responses are dropped and their shared memory given back."""
        return responses(request, lambda: self._run_streamed(request))

    def responses(
        self, request: InferRequest, *, decoupled_error: T.ErrorText | str = GRPC_DECOUPLED_ERROR
    ) -> AsyncGenerator[StreamItem, None]:
        """A streamed request's responses, whichever kind its model is: a decoupled model's
        as ``infer_stream`` gives them, another model's one result as the final response (its
        errors raise, as ``infer``'s)."""
        if self.is_decoupled(request.model_name, request.model_version):
            return self.infer_stream(request)
        return self._one_response(request, decoupled_error)

    async def _one_response(
        self, request: InferRequest, decoupled_error: T.ErrorText | str
    ) -> AsyncGenerator[StreamItem, None]:
        yield await self.infer(request, decoupled_error=decoupled_error), True

    async def _run_streamed(self, request: InferRequest) -> InferResult:
        """A decoupled request's execution (``infer_stream``); a refusal surfaces from the
        stream's first step, as the request's other errors do."""
        if not self.accepting:
            raise ServingError("the server is shutting down", code=ErrorCode.UNAVAILABLE)
        mv = self.registry.get(request.model_name, request.model_version)
        return await self._infer(mv, request)

    async def _cached(self, cache: ResponseCache, mv: ModelVersion, request: InferRequest) -> InferResult:
        """A cache hit answers at once (Triton counts it as a success with its lookup time as
        ``cache_hit``, and not as an inference); a miss runs the request and keeps its answer
        (lookup and insertion time count as ``cache_miss``)."""
        t0 = time.monotonic_ns()
        k = cache_key(request)
        entry = cache.get(k)
        t1 = time.monotonic_ns()
        if entry is not None:
            mv.stats.cache_hit(t1 - t0)
            hit = entry.result(request)
            trace = request.trace
            if trace is not None:  # as Triton traces a hit: the request's start and end, no compute
                trace.begin(mv.name, mv.version, request)
                trace.outputs(hit)
                trace.end()
            return hit
        result = await submit(mv, request, self._deadline_s(mv, request))
        t2 = time.monotonic_ns()
        cache.put(k, result)
        mv.stats.cache_miss(t1 - t0 + time.monotonic_ns() - t2)
        return result

    async def _infer(self, mv: ModelVersion, request: InferRequest) -> InferResult:
        request.model_version = mv.version
        uses_shm = request.uses_shm
        if uses_shm:
            # The regions stay counted until this request is done here; the dispatcher counts
            # its own use separately, until the worker has answered (even if this caller is
            # cancelled).
            self.shm.bind(request)
        try:
            validate(mv, request)
            cache = self.cache
            if cache is not None and mv.cached and cacheable(request):
                result = await self._cached(cache, mv, request)
            else:
                result = await submit(mv, request, self._deadline_s(mv, request))
        except (asyncio.CancelledError, DeadlineExceeded):
            if request.cancel is not None:  # the model may notice and stop early
                request.cancel()
            raise
        finally:
            if uses_shm:
                self.shm.unbind(request)
        if request.outputs is not None:
            try:
                classify(request, result, mv.labels, mv.config.max_batch_size > 0)
            except BaseException:
                result.done()
                raise
        return result


def _queue_policy_reads_timeout(config: mc.ModelConfig) -> bool:
    if not config.HasField("dynamic_batching"):
        return False
    db = config.dynamic_batching
    return db.default_queue_policy.allow_timeout_override or any(
        p.allow_timeout_override for p in db.priority_queue_policy.values()
    )
