"""``ModelManager``: the models of the repository, their versions, states and instances.

Owns every ``Worker`` (through the pools it builds) and the lifecycle of each model version:
UNAVAILABLE -> LOADING -> READY -> UNLOADING -> UNAVAILABLE. Lookups follow Triton's rules
(unknown model: INVALID_ARGUMENT; unknown version: NOT_FOUND; not ready: UNAVAILABLE).
Owned by the router's event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server import autocomplete, ensemble, gpus
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.pool import DispatchContext, InstancePool
from shoal.server.dispatch.worker import Worker, WorkerSpec, WorkerState
from shoal.server.repository import ModelSource, fingerprint, list_models, parse_config, read_model, validate_model_name
from shoal.server.scheduling.base import Scheduler
from shoal.server.scheduling.direct import DirectScheduler
from shoal.server.scheduling.dynamic import DynamicBatcher
from shoal.server.scheduling.ensemble import EnsembleScheduler
from shoal.server.scheduling.sequence import SequenceBatcher
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult
from shoal.server.validation import validate

log = logging.getLogger("shoal.models")

_LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("loading", default=())
"""The chain of ensembles whose loads led to the current load (finds cycles)."""


class ModelState(enum.Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A config input/output in the form request validation needs."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool
    reshape: tuple[int, ...] | None


@dataclass(slots=True)
class ModelVersion:
    name: str
    version: int
    config: mc.ModelConfig
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    pool: InstancePool | None = None
    scheduler: Scheduler | None = None
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    required_inputs: int = 0
    load_seconds: float = 0.0
    config_bytes: bytes = b""
    fingerprint: tuple[object, ...] = ()
    error_code: ErrorCode = ErrorCode.INTERNAL
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Lines of each output's ``label_filename`` (classification extension)."""
    stats: ModelStats = field(init=False)
    unavailable: Callable[[], str] | None = None
    """Ensembles: why a composing model cannot serve now ("" when all can)."""

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name, self.version)

    @property
    def ready(self) -> bool:
        if self.state is not ModelState.READY or self.pool is None:
            return False
        if self.unavailable is not None:
            return not self.unavailable()
        return self.pool.ready_count > 0


async def submit(mv: ModelVersion, request: InferRequest) -> InferResult:
    """``request`` (validated) to ``mv``'s scheduler; a failure is counted by its reason."""
    assert mv.scheduler is not None
    try:
        return await mv.scheduler.submit(request)
    except BaseException as exc:
        mv.stats.failed(exc)
        raise


def _no_instance(workers: list[Worker]) -> str:
    """Why a loaded version has no instance serving (the index's reason)."""
    why = "; ".join(f"instance '{w.spec.instance_name}': {w.reason}" for w in workers if w.reason)
    return "no instance is running" + (f" ({why})" if why else " (restarting)")


def _version_print(fp: tuple[object, ...], version: int) -> tuple[object, ...]:
    """The part of a model's fingerprint one version depends on: files outside version
    directories (config, labels) and those of its own directory."""
    files, override = fp
    assert isinstance(files, tuple)
    prefix = f"{version}{os.sep}"
    mine = tuple(f for f in files if f[0].startswith(prefix) or not f[0].split(os.sep, 1)[0].isdigit())
    return (mine, override)


def _tensor_specs(tensors: list[mc.ModelInput] | list[mc.ModelOutput]) -> dict[str, TensorSpec]:
    out = {}
    for t in tensors:
        reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
        out[t.name] = TensorSpec(
            name=t.name,
            datatype=dtypes.BY_CONFIG_NUMBER[t.data_type].protocol,
            dims=tuple(t.dims),
            optional=bool(getattr(t, "optional", False)),
            reshape=reshape,
        )
    return out


@dataclass(frozen=True, slots=True)
class InstanceSettings:
    """Router-wide settings every worker gets."""

    run_prefix: str
    worker_arena_bytes: int
    inline_max_bytes: int
    log_verbose: int = 0
    load_timeout_s: float = 120.0
    gpu_devices: tuple[str, ...] = ()
    """The server's GPUs as CUDA_VISIBLE_DEVICES entries (``server.gpus.devices``)."""
    heartbeat_timeout_s: float = 30.0
    stall_timeout_s: float = 0.0
    max_workers: int = 1024
    """Worker processes the server runs at most (``--max-worker-processes``)."""
    python: str = ""
    """The interpreter that runs workers (``--worker-python``; empty: the router's)."""
    client_shm_mapped: bool = False


class ModelManager:
    """``mode``: "none" (load everything at start), "poll" (and follow the repository), or
    "explicit" (load / unload on request). Operations on one model are serialized."""

    def __init__(
        self,
        repository: Path,
        *,
        channel: WorkerChannel,
        ctx: DispatchContext,
        settings: InstanceSettings,
        mode: str = "none",
        drain_timeout_s: float = 30.0,
        auto_complete: bool = True,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.auto_complete = auto_complete
        self.refresh = refresh
        """Brings a remote repository's local copy up to date (before polls and loads)."""
        self.repository = repository
        self.channel = channel
        self.ctx = ctx
        self.settings = settings
        self.mode = mode
        self.drain_timeout_s = drain_timeout_s
        self.sources: dict[str, ModelSource] = {}
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.wanted: set[str] = set()
        """Models that should be loaded: strict readiness looks at these."""
        self.fingerprints: dict[str, tuple[object, ...]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._instance_counter = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self._live: set[Worker] = set()
        """Every worker made and not yet stopped (the ``max_workers`` bound counts these)."""

    # ---- loading -------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        """Load every model of the repository (or ``names``) concurrently; failures are
        logged and kept as UNAVAILABLE with a reason, never raised."""
        if names is None:
            names = list_models(self.repository)

        async def one(name: str) -> None:
            try:
                await self.load(name, record_missing=True)
            except ServingError:
                pass  # logged and recorded by load()

        await asyncio.gather(*(one(name) for name in names))

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(self, name: str, override: mc.ModelConfig | None = None, *, record_missing: bool = False) -> None:
        """Load or reload ``name``. New or changed versions are loaded while the old ones
        keep serving, then swapped in; versions no longer chosen (or replaced) finish their
        requests and stop. A version that fails to load keeps its old instance serving.
        Raises ``ServingError`` naming what failed.

        A name that is neither a directory of the repository nor a known model fails at once
        and leaves no trace (index, readiness), as in Triton; ``record_missing`` (models
        named on the command line) records it as UNAVAILABLE instead."""
        validate_model_name(name)
        if not record_missing and name not in self.sources and not (self.repository / name).is_dir():
            raise InvalidInput(f"failed to load '{name}', failed to poll from model repository")
        chain = _LOADING.get()
        if name in chain:
            raise InvalidInput(f"failed to load '{name}': ensembles form a cycle: {' -> '.join((*chain, name))}")
        token = _LOADING.set((*chain, name))
        try:
            await self._load(name, override)
        finally:
            _LOADING.reset(token)

    async def _load(self, name: str, override: mc.ModelConfig | None) -> None:
        async with self._lock(name):
            self.wanted.add(name)
            fp = (fingerprint(self.repository / name), override.SerializeToString() if override else b"")
            try:
                if self.auto_complete:
                    override = await autocomplete.complete(
                        self.repository, name, override, self.settings.load_timeout_s, self.settings.python
                    )
                src = read_model(self.repository, name, len(self.settings.gpu_devices), override)
                if not src.error and ensemble.is_ensemble(src.config):
                    await self._load_composing(src.config)
            except ServingError as exc:
                src = ModelSource(name=name, path=self.repository / name, error=exc.message)
            old = self.models.get(name, {})
            serving = {v: mv for v, mv in old.items() if mv.ready}
            if src.error:
                log.error("model '%s' cannot be loaded: %s", name, src.error)
                if serving:
                    self.sources[name].error = ""
                    self.sources[name].reload_error = src.error
                    raise InvalidInput(f"failed to load '{name}': {src.error}; the previous version keeps serving")
                self.sources[name] = src
                self.models[name] = {}
                self.fingerprints[name] = fp
                await self._retire_all(old.values())
                raise InvalidInput(f"failed to load '{name}': {src.error}")
            config_bytes = src.config.SerializeToString(deterministic=True)
            chosen: dict[int, ModelVersion] = {}
            starting: list[ModelVersion] = []
            for v in src.versions:
                mv = serving.get(v)
                if mv is not None and mv.config_bytes == config_bytes and mv.fingerprint == _version_print(fp, v):
                    chosen[v] = mv  # unchanged: keeps serving as it is
                    continue
                fresh = self._new_version(src, v)
                fresh.config_bytes = config_bytes
                fresh.fingerprint = _version_print(fp, v)
                chosen[v] = fresh
                starting.append(fresh)
            if starting and not old:
                self.models[name] = chosen  # first load: LOADING states are visible at once
            await asyncio.gather(*(self._load_version(mv) for mv in starting))
            failed = [mv for mv in starting if mv.state is not ModelState.READY]
            for mv in failed:
                previous = serving.get(mv.version)
                if previous is not None:
                    chosen[mv.version] = previous
            if failed and serving and not any(mv.state is ModelState.READY for mv in chosen.values()):
                # no newly chosen version could load (e.g. a broken new version directory):
                # the versions serving now go on serving
                chosen = {v: mv for v, mv in chosen.items() if mv.state is ModelState.READY} | serving
            src.reload_error = "; ".join(f"version {mv.version}: {mv.reason}" for mv in failed)
            self.sources[name] = src
            self.models[name] = chosen
            self.fingerprints[name] = fp
            await self._retire_all(mv for v, mv in old.items() if chosen.get(v) is not mv)
            if failed:
                raise ServingError(
                    f"failed to load '{name}': {src.reload_error}",
                    code=failed[0].error_code,
                )

    async def _load_composing(self, config: mc.ModelConfig) -> None:
        """Make sure every model an ensemble's steps use is loaded (loading it if not)."""
        self._check_cycle(config)
        for sub in ensemble.composing_models(config):
            if not sub:
                continue  # the plan reports it, naming the step
            lock = self._lock(sub)
            if lock.locked():
                async with lock:
                    pass  # being loaded (e.g. at start-up): wait for that load
            if any(mv.ready for mv in self.models.get(sub, {}).values()):
                continue
            try:
                await self.load(sub)
            except ServingError as exc:
                raise InvalidInput(f"composing model '{sub}' failed to load: {exc.message}") from None

    def _check_cycle(self, config: mc.ModelConfig) -> None:
        """Refuse an ensemble that reaches itself through nested ensembles (read from the
        repository's configs: two loads waiting for each other would never finish)."""

        def visit(cfg: mc.ModelConfig, path: tuple[str, ...]) -> None:
            for sub in ensemble.composing_models(cfg):
                if sub in path:
                    raise InvalidInput(f"ensembles form a cycle: {' -> '.join((*path, sub))}")
                try:
                    validate_model_name(sub)
                    sub_cfg = parse_config(self.repository / sub, sub)
                except ServingError:
                    continue  # not an ensemble we can read: its own load reports it
                if ensemble.is_ensemble(sub_cfg):
                    visit(sub_cfg, (*path, sub))

        visit(config, (config.name,))

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Stop serving ``name``: new requests fail at once, requests in flight finish.
        ``dependents``: also unload the ensembles using ``name`` and, when ``name`` is an
        ensemble, the composing models no other loaded ensemble uses."""
        validate_model_name(name)
        composing = self._composing_of(name) if dependents else []
        users = self._ensembles_using(name) if dependents else []
        await self._unload(name)
        for other in users:
            if self.models.get(other):
                log.info("unloading ensemble '%s', which uses '%s'", other, name)
                await self._unload(other)
        for sub in composing:
            if self.models.get(sub) and not self._ensembles_using(sub):
                log.info("unloading '%s', a composing model of '%s'", sub, name)
                await self.unload(sub, dependents=True)

    def _composing_of(self, name: str) -> list[str]:
        return sorted(
            {sub for mv in self.models.get(name, {}).values() for sub in ensemble.composing_models(mv.config)}
        )

    def _ensembles_using(self, name: str) -> list[str]:
        """Loaded ensembles with a step on ``name``."""
        return sorted(
            other
            for other, versions in self.models.items()
            if any(
                mv.state is ModelState.READY and name in ensemble.composing_models(mv.config)
                for mv in versions.values()
            )
        )

    async def _unload(self, name: str) -> None:
        async with self._lock(name):
            self.wanted.discard(name)
            versions = self.models.get(name)
            if not versions and name not in self.sources:
                raise InvalidInput(f"failed to unload '{name}': no such model is loaded")
            await self._retire_all(list((versions or {}).values()))
            src = self.sources.get(name)
            if src is not None:
                src.error = ""
                src.reload_error = ""
            self.fingerprints.pop(name, None)

    async def _retire_all(self, versions: Iterable[ModelVersion]) -> None:
        await asyncio.gather(*(self._retire(mv) for mv in list(versions)))

    async def _retire(self, mv: ModelVersion) -> None:
        if mv.state is ModelState.UNAVAILABLE and mv.pool is None:
            mv.reason = mv.reason or "unloaded"
            return
        mv.state = ModelState.UNLOADING
        if mv.scheduler is not None:
            await mv.scheduler.drain(self.drain_timeout_s)
        if mv.pool is not None:
            await asyncio.gather(*(w.stop() for w in mv.pool.workers), return_exceptions=True)
        mv.state = ModelState.UNAVAILABLE
        mv.reason = "unloaded"
        log.info("model '%s' version %d unloaded", mv.name, mv.version)

    # ---- polling -------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Pick up models, versions, configs and label files added, changed or removed."""
        if self.refresh is not None:
            await self.refresh()
        present = set(list_models(self.repository))
        known = set(self.fingerprints)
        for name in sorted(known - present):
            log.info("model '%s' left the repository: unloading", name)
            try:
                await self.unload(name)
            except ServingError as exc:
                log.error("unloading '%s' failed: %s", name, exc.message)
        changed: set[str] = set()
        for name in sorted(present):
            fp = (fingerprint(self.repository / name), b"")
            if self.fingerprints.get(name) == fp:
                continue
            log.info("model '%s' changed in the repository: (re)loading", name)
            changed.add(name)
            try:
                await self.load(name)
            except ServingError as exc:
                log.error("%s", exc.message)
        for name in sorted(present - changed):
            # an ensemble that failed to load may load now that a composing model changed
            src = self.sources.get(name)
            if src is None or not src.error or not changed & set(self._composing_on_disk(name)):
                continue
            log.info("ensemble '%s': a composing model changed; loading it again", name)
            try:
                await self.load(name)
            except ServingError as exc:
                log.error("%s", exc.message)

    def _composing_on_disk(self, name: str) -> list[str]:
        """The composing models of ``name``'s config.pbtxt ([] if it is no readable ensemble)."""
        try:
            config = parse_config(self.repository / name, name)
        except ServingError:
            return []
        return ensemble.composing_models(config) if ensemble.is_ensemble(config) else []

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - polling must go on
                log.exception("polling the model repository failed")

    # ---- index ---------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one entry per known version; model directories never
        loaded appear with their name only."""
        out: list[dict[str, str]] = []
        names = set(self.models) | set(self.sources)
        try:
            names |= set(list_models(self.repository))
        except OSError:
            pass
        for name in sorted(names):
            versions = self.models.get(name, {})
            src = self.sources.get(name)
            if not versions:
                if ready_only:
                    continue
                entry = {"name": name}
                if src is not None and src.error:
                    entry.update(state="UNAVAILABLE", reason=src.error)
                out.append(entry)
                continue
            for v, mv in sorted(versions.items()):
                if ready_only and not mv.ready:
                    continue
                entry = {"name": name, "version": str(v), "state": mv.state.value}
                reason = mv.reason
                why = mv.unavailable() if mv.unavailable is not None and mv.state is ModelState.READY else ""
                pool = mv.pool
                serving = mv.state is ModelState.READY and pool is not None and pool.workers
                if not why and serving and pool is not None and not pool.ready_count:
                    why = _no_instance(pool.workers)
                if why:
                    entry["state"], reason = ModelState.UNAVAILABLE.value, why
                if mv.ready and src is not None and src.reload_error:
                    reason = f"reload failed, still serving: {src.reload_error}"
                if reason:
                    entry["reason"] = reason
                out.append(entry)
        return out

    def _new_version(self, src: ModelSource, version: int) -> ModelVersion:
        mv = ModelVersion(name=src.name, version=version, config=src.config)
        mv.labels = src.labels
        mv.inputs = _tensor_specs(list(src.config.input))
        mv.outputs = _tensor_specs(list(src.config.output))
        mv.required_inputs = sum(1 for t in mv.inputs.values() if not t.optional)
        return mv

    def _check_worker_budget(self, mv: ModelVersion) -> None:
        """Refuse a version whose instances would pass ``--max-worker-processes``."""
        self._live = {w for w in self._live if w.state not in (WorkerState.STOPPED, WorkerState.FAILED)}
        wanted = sum(len(self._placements(g)) for g in mv.config.instance_group)
        limit = self.settings.max_workers
        if len(self._live) + wanted > limit:
            raise ServingError(
                f"model '{mv.name}' version {mv.version} needs {wanted} worker processes; the server runs "
                f"{len(self._live)} of at most {limit} (--max-worker-processes)",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )

    async def _load_version(self, mv: ModelVersion) -> None:
        mv.state = ModelState.LOADING
        started = time.monotonic()
        try:
            self._check_worker_budget(mv)
        except ServingError as exc:
            self._failed(mv, exc)
            return
        workers = self._make_workers(mv)
        self._live.update(workers)
        pool = InstancePool(workers, self.ctx, mv.stats)
        try:
            # before any process starts: a scheduler's configuration errors (e.g. a missing
            # initial-state file) need no worker to be found
            scheduler = self._scheduler(mv, pool)
        except (ServingError, OSError) as exc:
            self._failed(mv, exc)
            return
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
            self._failed(mv, errors[0])
            return
        mv.pool, mv.scheduler = pool, scheduler
        mv.state = ModelState.READY
        mv.reason = ""
        mv.load_seconds = time.monotonic() - started
        log.info(
            "model '%s' version %d ready (%d instances, %.2f s)", mv.name, mv.version, len(workers), mv.load_seconds
        )

    def _scheduler(self, mv: ModelVersion, pool: InstancePool) -> Scheduler:
        if ensemble.is_ensemble(mv.config):
            plan = ensemble.plan(mv.config, lambda name, version: self.get(name, version).config)
            mv.unavailable = lambda: self._steps_unavailable(plan)
            return EnsembleScheduler(plan, self.run_step, mv.stats)
        if mv.config.HasField("sequence_batching"):
            return SequenceBatcher(pool, mv.config, mv.stats, self.repository / mv.name)
        if mv.config.max_batch_size > 0 and mv.config.HasField("dynamic_batching"):
            return DynamicBatcher(pool, mv.config, mv.stats)
        return DirectScheduler(pool, mv.stats)

    @staticmethod
    def _failed(mv: ModelVersion, exc: BaseException) -> None:
        mv.state = ModelState.UNAVAILABLE
        mv.reason = exc.message if isinstance(exc, ServingError) else str(exc) or repr(exc)
        mv.error_code = exc.code if isinstance(exc, ServingError) else ErrorCode.INTERNAL
        log.error("model '%s' version %d failed to load: %s", mv.name, mv.version, mv.reason)

    def _placements(self, group: mc.ModelInstanceGroup) -> list[tuple[str, int]]:
        """(device kind, server GPU ordinal or -1) of each instance of ``group``."""
        kinds = mc.ModelInstanceGroup
        if group.kind == kinds.KIND_GPU:
            return [("GPU", gpu) for gpu in group.gpus for _ in range(group.count)]
        kind = "MODEL" if group.kind == kinds.KIND_MODEL else "CPU"
        return [(kind, -1)] * group.count

    def _make_workers(self, mv: ModelVersion) -> list[Worker]:
        config_bytes = mv.config.SerializeToString()
        devs = list(self.settings.gpu_devices)
        workers = []
        for group in mv.config.instance_group:
            for i, (kind, gpu) in enumerate(self._placements(group)):
                self._instance_counter += 1
                instance = f"{group.name}_{i}"
                env: tuple[tuple[str, str], ...] = ()
                order: list[int] = []
                if kind == "GPU":
                    # its GPU is device 0 to the worker; the others stay visible behind it
                    env = (("CUDA_VISIBLE_DEVICES", gpus.visible_env(gpu, devs)),)
                    order = gpus.worker_order(gpu, devs)
                load = wpb.Load(
                    model_config=config_bytes,
                    repository=str(self.repository),
                    model_name=mv.name,
                    model_version=mv.version,
                    instance_name=instance,
                    device_kind=kind,
                    device_index=gpu,
                    arena_bytes=self.settings.worker_arena_bytes,
                    inline_max_bytes=self.settings.inline_max_bytes,
                    gpu_order=order,
                    priority=int(mv.config.optimization.priority),
                    client_shm_mapped=self.settings.client_shm_mapped,
                )
                spec = WorkerSpec(
                    model_name=mv.name,
                    model_version=mv.version,
                    instance_name=instance,
                    load=load,
                    load_timeout_s=self.settings.load_timeout_s,
                    log_verbose=self.settings.log_verbose,
                    env=env,
                    heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
                    stall_timeout_s=self.settings.stall_timeout_s,
                    python=self.settings.python,
                )
                prefix = f"{self.settings.run_prefix}_w{self._instance_counter}"
                workers.append(Worker(spec, channel=self.channel, arena_prefix=prefix, on_exit=self._on_worker_exit))
        return workers

    def _on_worker_exit(self, worker: Worker) -> None:
        # Outputs of the dead process are unreadable now; drop our mappings of its arena,
        # and those of other workers (ensemble steps read it in place).
        self.ctx.mapper.forget_prefix(worker.arena_prefix)
        for other in self.workers():
            if other is not worker:
                other.forget(arena_prefixes=[worker.arena_prefix])

    def _steps_unavailable(self, plan: ensemble.EnsemblePlan) -> str:
        for step in plan.steps:
            try:
                self.get(step.model, step.version)
            except ServingError:
                return f"composing model '{step.model}' is not available"
        return ""

    async def run_step(self, request: InferRequest) -> InferResult:
        """One ensemble step: ``request`` on the model it names, as a client request would
        run (version policy, validation, that model's scheduler)."""
        mv = self.get(request.model_name, request.model_version)
        request.model_version = mv.version
        validate(mv, request)
        return await submit(mv, request)

    # ---- lookups -------------------------------------------------------------------------

    def get(self, name: str, version: int = -1) -> ModelVersion:
        """The version to serve; raises Triton's errors for unknown / unready models."""
        versions = self.models.get(name)
        if versions is None:
            raise InvalidInput(f"Request for unknown model: '{name}' is not found")
        if version < 0:
            ready = [mv for mv in versions.values() if mv.ready]
            if not ready:
                why = next((w for mv in versions.values() if mv.unavailable and (w := mv.unavailable())), "")
                raise ServingError(
                    f"Request for unknown model: '{name}' has no available versions" + (f" ({why})" if why else ""),
                    code=ErrorCode.NOT_FOUND if not versions else ErrorCode.UNAVAILABLE,
                    retryable=bool(versions),
                )
            return max(ready, key=lambda mv: mv.version)
        mv = versions.get(version)
        if mv is None:
            raise ServingError(
                f"Request for unknown model: '{name}' version {version} is not found", code=ErrorCode.NOT_FOUND
            )
        if not mv.ready:
            raise ServingError(
                f"Request for unknown model: '{name}' version {version} is not at ready state",
                code=ErrorCode.UNAVAILABLE,
                retryable=True,
            )
        return mv

    def all_ready(self) -> bool:
        """Every model that should be loaded has every chosen version ready (strict
        readiness); in explicit mode only the models loaded on request count."""
        for name in self.wanted:
            src = self.sources.get(name)
            versions = self.models.get(name)
            if src is None or src.error or not versions:
                return False
            if not all(mv.ready for mv in versions.values()):
                return False
        return True

    def instances(self) -> list[dict[str, object]]:
        """Every worker process (the admin API's list)."""
        out: list[dict[str, object]] = []
        for name, versions in sorted(self.models.items()):
            for v, mv in sorted(versions.items()):
                for w in mv.pool.workers if mv.pool is not None else ():
                    load = w.spec.load
                    out.append(
                        {
                            "model": name,
                            "version": str(v),
                            "instance": w.spec.instance_name,
                            "state": w.state.value,
                            "pid": w.pid,
                            "restarts": w.restarts,
                            "outstanding": w.outstanding,
                            "device": f"GPU {load.device_index}" if load.device_kind == "GPU" else load.device_kind,
                            "reason": w.reason,
                        }
                    )
        return out

    async def restart_instance(self, name: str, instance: str, version: int = -1) -> list[dict[str, object]]:
        """Restart one instance (of every loaded version, or of ``version``): the others keep
        serving; its in-flight batches finish first (up to the drain timeout)."""
        versions = self.models.get(name)
        if not versions:
            raise ServingError(f"model '{name}' is not loaded", code=ErrorCode.NOT_FOUND)
        chosen = [mv for v, mv in versions.items() if version < 0 or v == version]
        workers = [
            w for mv in chosen if mv.pool is not None for w in mv.pool.workers if w.spec.instance_name == instance
        ]
        if not workers:
            where = f"version {version} of model '{name}'" if version >= 0 else f"model '{name}'"
            raise ServingError(f"{where} has no instance '{instance}'", code=ErrorCode.NOT_FOUND)
        await asyncio.gather(*(w.restart(self.drain_timeout_s) for w in workers))
        return [i for i in self.instances() if i["model"] == name and i["instance"] == instance]

    def workers(self) -> list[Worker]:
        return [w for vs in self.models.values() for mv in vs.values() if mv.pool for w in mv.pool.workers]

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting and let requests in flight finish: ensembles first (their later
        steps still need the composing models), then every other model."""
        deadline = time.monotonic() + timeout_s
        versions = [mv for vs in self.models.values() for mv in vs.values() if mv.scheduler]
        waves: list[list[ModelVersion]] = []
        ensembles = [mv for mv in versions if ensemble.is_ensemble(mv.config)]
        while ensembles:  # outer ensembles before the nested ones they call
            names = {mv.name for mv in ensembles}
            wave = [mv for mv in ensembles if not names & set(self._ensembles_using(mv.name))] or ensembles
            waves.append(wave)
            ensembles = [mv for mv in ensembles if mv not in wave]
        waves.append([mv for mv in versions if not ensemble.is_ensemble(mv.config)])
        for wave in waves:
            left = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(mv.scheduler.drain(left) for mv in wave if mv.scheduler is not None))

    async def stop(self, timeout_s: float = 10.0) -> None:
        for vs in self.models.values():
            for mv in vs.values():
                if mv.state is ModelState.READY:
                    mv.state = ModelState.UNLOADING
        await asyncio.gather(*(w.stop(timeout_s) for w in self.workers()), return_exceptions=True)
        for vs in self.models.values():
            for mv in vs.values():
                mv.state = ModelState.UNAVAILABLE
                mv.reason = "unloaded"
