"""What describes a worker (``WorkerSpec``), its states, and the types of its replies and
streamed responses: shared by the worker supervisor, the pool and the model manager."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb


class WorkerState(enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"
    """An operator asked for a restart: no new work; in-flight batches finish first."""
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs: the ``Load`` message (without its arena prefix) and limits."""

    model_name: str
    model_version: int
    instance_name: str
    load: wpb.Load
    load_timeout_s: float = 120.0
    restart_backoff_max_s: float = 10.0
    log_verbose: int = 0
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment of the worker process (e.g. its CUDA_VISIBLE_DEVICES)."""
    heartbeat_timeout_s: float = 30.0
    """No heartbeat for this long: the process is stopped or stuck (holding the GIL), and is
    killed and replaced. 0: never."""
    stall_timeout_s: float = 0.0
    """A batch unanswered for this long means the backend is stuck (e.g. in C with the GIL
    released): the process is killed and replaced. 0: never."""
    python: str = ""
    """The interpreter that runs the worker (empty: the router's)."""


Reply = tuple[wpb.Envelope, list[bytes]]


class StreamSink(Protocol):
    """Where a decoupled batch's responses go (``InstancePool``): each as it arrives, then
    ``fail`` for the requests still open if the worker dies."""

    def on(self, index: int, result: wpb.Result | None, frames: list[bytes], final: bool) -> None: ...

    def fail(self, err: ServingError) -> None: ...

    def ended(self, indexes: Iterable[int]) -> None:
        """These requests' execution returned without a final response because they run
        again in a later batch (rescheduled): they expect nothing more from this one."""
        ...

    @property
    def closed(self) -> bool:
        """Every request of the batch has had its final response."""
        ...
