"""``ModelManager``: the models of the repository, their versions, states and instances.

Owns every ``Worker`` (through the pools it builds) and the lifecycle of each model version:
UNAVAILABLE -> LOADING -> READY -> UNLOADING -> UNAVAILABLE. Lookups follow Triton's rules
(unknown model: INVALID_ARGUMENT; unknown version: NOT_FOUND; not ready: UNAVAILABLE).
Owned by the router's event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from proto import dtypes
from proto.errors import ErrorCode, InvalidInput, ServingError
from proto.gen import model_config_pb2 as mc
from proto.gen import worker_pb2 as wpb
from server import gpus
from server.dispatch.channel import WorkerChannel
from server.dispatch.pool import DispatchContext, InstancePool
from server.dispatch.worker import Worker, WorkerSpec
from server.repository import ModelSource, list_models, read_model
from server.scheduling.base import Scheduler
from server.scheduling.direct import DirectScheduler
from server.scheduling.dynamic import DynamicBatcher
from server.stats import ModelStats

log = logging.getLogger("shoal.models")


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
    stats: ModelStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name, self.version)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self.pool is not None and self.pool.ready_count > 0


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


class ModelManager:
    def __init__(
        self, repository: Path, *, channel: WorkerChannel, ctx: DispatchContext, settings: InstanceSettings
    ) -> None:
        self.repository = repository
        self.channel = channel
        self.ctx = ctx
        self.settings = settings
        self.sources: dict[str, ModelSource] = {}
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self._instance_counter = 0

    # ---- loading -------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model of the repository concurrently; failures are logged and kept
        as UNAVAILABLE with a reason, never raised."""
        names = list_models(self.repository)
        await asyncio.gather(*(self.load(name) for name in names))

    async def load(self, name: str) -> None:
        src = read_model(self.repository, name, len(self.settings.gpu_devices))
        self.sources[name] = src
        if src.error:
            log.error("model '%s' cannot be loaded: %s", name, src.error)
            self.models[name] = {}
            return
        versions = {v: self._new_version(src, v) for v in src.versions}
        self.models[name] = versions
        await asyncio.gather(*(self._load_version(mv) for mv in versions.values()))

    def _new_version(self, src: ModelSource, version: int) -> ModelVersion:
        mv = ModelVersion(name=src.name, version=version, config=src.config)
        mv.inputs = _tensor_specs(list(src.config.input))
        mv.outputs = _tensor_specs(list(src.config.output))
        mv.required_inputs = sum(1 for t in mv.inputs.values() if not t.optional)
        return mv

    async def _load_version(self, mv: ModelVersion) -> None:
        mv.state = ModelState.LOADING
        started = time.monotonic()
        workers = self._make_workers(mv)
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
            first = errors[0]
            mv.state = ModelState.UNAVAILABLE
            mv.reason = first.message if isinstance(first, ServingError) else repr(first)
            log.error("model '%s' version %d failed to load: %s", mv.name, mv.version, mv.reason)
            return
        mv.pool = InstancePool(workers, self.ctx, mv.stats)
        if mv.config.max_batch_size > 0 and mv.config.HasField("dynamic_batching"):
            mv.scheduler = DynamicBatcher(mv.pool, mv.config, mv.stats)
        else:
            mv.scheduler = DirectScheduler(mv.pool, mv.stats)
        mv.state = ModelState.READY
        mv.reason = ""
        mv.load_seconds = time.monotonic() - started
        log.info(
            "model '%s' version %d ready (%d instances, %.2f s)", mv.name, mv.version, len(workers), mv.load_seconds
        )

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
                )
                spec = WorkerSpec(
                    model_name=mv.name,
                    model_version=mv.version,
                    instance_name=instance,
                    load=load,
                    load_timeout_s=self.settings.load_timeout_s,
                    log_verbose=self.settings.log_verbose,
                    env=env,
                )
                prefix = f"{self.settings.run_prefix}_w{self._instance_counter}"
                workers.append(Worker(spec, channel=self.channel, arena_prefix=prefix, on_exit=self._on_worker_exit))
        return workers

    def _on_worker_exit(self, worker: Worker) -> None:
        # Outputs of the dead process are unreadable now; drop our mappings of its arena.
        self.ctx.mapper.forget_prefix(worker.arena_prefix)

    # ---- lookups -------------------------------------------------------------------------

    def get(self, name: str, version: int = -1) -> ModelVersion:
        """The version to serve; raises Triton's errors for unknown / unready models."""
        versions = self.models.get(name)
        if versions is None:
            raise InvalidInput(f"Request for unknown model: '{name}' is not found")
        if version < 0:
            ready = [mv for mv in versions.values() if mv.ready]
            if not ready:
                raise ServingError(
                    f"Request for unknown model: '{name}' has no available versions",
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
        """Every model of the repository has every chosen version ready (strict readiness)."""
        for name, src in self.sources.items():
            if src.error:
                return False
            if not all(mv.ready for mv in self.models.get(name, {}).values()):
                return False
        return True

    def workers(self) -> list[Worker]:
        return [w for vs in self.models.values() for mv in vs.values() if mv.pool for w in mv.pool.workers]

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        schedulers = [mv.scheduler for vs in self.models.values() for mv in vs.values() if mv.scheduler]
        await asyncio.gather(*(s.drain(timeout_s) for s in schedulers))

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
