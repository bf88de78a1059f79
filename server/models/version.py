"""``ModelVersion``: one version of one model as the router serves it, with its state,
tensors, pool of workers, scheduler and statistics."""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.proto.errors import DeadlineExceeded, ErrorCode
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.validation import TensorSpec as TensorSpec
from shoal.proto.validation import tensor_specs as tensor_specs
from shoal.server.dispatch.pool import InstancePool
from shoal.server.repository import ModelSource
from shoal.server.scheduling.base import Scheduler
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult


class ModelState(enum.Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


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
    decoupled: bool = field(init=False)
    """``model_transaction_policy.decoupled`` (read once, not per request)."""
    cached: bool = field(init=False)
    """``response_cache.enable``: the response cache may answer its requests."""

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name, self.version)
        self.decoupled = self.config.model_transaction_policy.decoupled
        self.cached = self.config.response_cache.enable

    @property
    def ready(self) -> bool:
        if self.state is not ModelState.READY or self.pool is None:
            return False
        if self.unavailable is not None:
            return not self.unavailable()
        return self.pool.ready_count > 0


def new_version(src: ModelSource, version: int) -> ModelVersion:
    """A version of ``src`` not loaded yet (UNAVAILABLE)."""
    mv = ModelVersion(name=src.name, version=version, config=src.config)
    mv.labels = src.labels
    mv.inputs = tensor_specs(list(src.config.input))
    mv.outputs = tensor_specs(list(src.config.output))
    mv.required_inputs = sum(1 for t in mv.inputs.values() if not t.optional)
    return mv


async def submit(mv: ModelVersion, request: InferRequest, deadline_s: float = 0.0) -> InferResult:
    """``request`` (validated) to ``mv``'s scheduler, given up after ``deadline_s`` seconds
    (0: never); a failure is counted by its reason (a deadline: REJECTED, as Triton counts a
    request that timed out). A traced request records REQUEST_START, QUEUE_START (its
    inputs), its outputs and REQUEST_END here, for client requests and ensemble steps alike."""
    assert mv.scheduler is not None
    trace = request.trace
    if trace is not None:
        trace.begin(mv.name, mv.version, request)
    try:
        if not deadline_s:
            result = await mv.scheduler.submit(request)
            if trace is not None:
                trace.outputs(result)
            return result
        try:
            async with asyncio.timeout(deadline_s):
                result = await mv.scheduler.submit(request)
                if trace is not None:
                    trace.outputs(result)
                return result
        except TimeoutError:
            if request.instance:
                where = f"instance '{request.instance}' is still executing it"
            else:
                where = "its steps were still running" if mv.config.platform == "ensemble" else "still queued"
            raise DeadlineExceeded(
                f"request for model '{mv.name}' version {mv.version} did not complete within its deadline "
                f"of {deadline_s:g} s ({where})"
            ) from None
    except BaseException as exc:
        mv.stats.failed(exc)
        raise
    finally:
        if trace is not None:
            trace.end()


def version_print(fp: tuple[object, ...], version: int) -> tuple[object, ...]:
    """The part of a model's fingerprint one version depends on: files outside version
    directories (config, labels) and those of its own directory."""
    files, override = fp
    assert isinstance(files, tuple)
    prefix = f"{version}{os.sep}"
    mine = tuple(f for f in files if f[0].startswith(prefix) or not f[0].split(os.sep, 1)[0].isdigit())
    return (mine, override)
