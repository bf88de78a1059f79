"""Shoal's ``SHOAL_PIPELINE_BATCHES`` model parameter, and batches run on a thread of their own.

A ``pipelined`` backend's ``launch`` returns while its batch still computes, so the worker
reads and launches the next batch meanwhile (``WorkerRuntime._pipeline_lanes``). PyTorch
queues the batch on its CUDA stream (``torchgpu``). onnxruntime has no such asynchronous run
in Python, but its run lets go of the GIL, so ``BatchThread`` runs each batch on one thread of
the backend's own, one batch after the other, and the worker's main thread goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from shoal.proto.errors import InvalidInput
from shoal.workers.backends.base import Launched, ModelSpec, WorkResponse


def pipelined(spec: ModelSpec, auto: bool) -> bool:
    """``SHOAL_PIPELINE_BATCHES`` (``auto``, ``true``, ``false``): whether the worker reads and
    launches a batch while the one before runs (``WorkerRuntime._pipeline_lanes``); ``auto``
    (the default) gives ``auto``.

    ``auto`` is true for every GPU instance: PyTorch's on a CUDA device, onnxruntime's on the
    CUDA provider with IO binding. onnxruntime on the H200 (resnet18 export, one instance, 8
    frontend processes, a connection per perf_analyzer context, one run each, 2026-12-02):
    pipelined against not, CUDA shm c=64 4.72k vs 4.60k infer/s, c=256 8.13k vs 7.38k; system
    shm c=64 3.15k vs 3.10k, c=256 5.08k vs 4.94k; the worker's main thread, the busiest
    thread without the pipeline (82-98%), went down to 47-73%. PyTorch (resnet18
    TorchScript, CUDA graphs, 4 frontend processes, against the same code not pipelining):
    one instance 1.16-1.72x over system and CUDA shared memory at c=64 and c=256; two
    instances on one GPU at c=256 8.3-8.5k infer/s against 6.6-8.1k (three runs each,
    perf_analyzer with a connection per context). An earlier run had two pipelined instances
    fall into batches of 2-6 at c=256; that was perf_analyzer's few connections landing on
    one or two of the four frontend processes (``scripts/bench_gpu`` shows the spread per
    row), with or without the pipeline. ``true`` on the CPU runs the same data path and
    pipeline, so that it can be tested without a GPU: PyTorch has then run the batch when it
    is launched (only the order of work changes), onnxruntime runs it on its thread while the
    worker reads the next."""
    p = spec.config.parameters.get("SHOAL_PIPELINE_BATCHES")
    given = p.string_value if p is not None else ""
    value = given.strip().lower() or "auto"
    if value not in ("auto", "true", "false"):
        raise InvalidInput(
            f"model '{spec.name}': parameter SHOAL_PIPELINE_BATCHES must be auto, true or false, got '{given}'"
        )
    if value == "auto":
        return auto
    return value == "true"


def switch_interval_us(spec: ModelSpec) -> int:
    """``SHOAL_GIL_SWITCH_INTERVAL_US`` (see ``BatchThread``): a positive integer, else
    ``SWITCH_INTERVAL_US``."""
    p = spec.config.parameters.get("SHOAL_GIL_SWITCH_INTERVAL_US")
    given = p.string_value.strip() if p is not None else ""
    if not given:
        return SWITCH_INTERVAL_US
    if not given.isdigit() or int(given) <= 0:
        raise InvalidInput(
            f"model '{spec.name}': parameter SHOAL_GIL_SWITCH_INTERVAL_US must be a positive integer "
            f"(microseconds), got '{given}'"
        )
    return int(given)


SWITCH_INTERVAL_US: Final = 500
"""The worker's GIL switch interval with a ``BatchThread`` (Python's default is 5000)."""


class BatchThread:
    """One thread that runs a backend's batches in the order they are launched.

    When a batch's run is done on the device, its thread needs the GIL back to answer it, and
    the worker's main thread, busy reading the next batch's requests, holds it: Python hands
    it over only when the holder waits or its switch interval (5 ms by default) has passed,
    so each batch could finish up to 5 ms late, as long as a resnet18 batch of 64 computes.
    The thread sets the worker's interval to ``SHOAL_GIL_SWITCH_INTERVAL_US`` (a model
    parameter, microseconds; ``SWITCH_INTERVAL_US`` by default). A worker process serves one
    model instance, so this touches no other model."""

    def __init__(self, name: str, switch_interval_us: int = SWITCH_INTERVAL_US) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        if switch_interval_us > 0:
            sys.setswitchinterval(switch_interval_us / 1e6)

    def launch(self, work: Callable[[], list[WorkResponse]]) -> Launched:
        """``work`` (a batch's run and split), not begun: its ``start`` hands it to the thread
        (after the batches started before it), its ``finish`` waits for it and gives its
        responses or raises what it raised, and runs it on the caller's thread when nothing
        started it. The worker starts a batch only when a request is waiting to be read
        behind it (``LaneRuns._waiting_lane_batch``); with none, as at c=1, handing the batch
        to the thread and waiting for it there only added two thread switches (onnxruntime
        identity on the CPU, gRPC c=1 through a frontend: p50 851 and 858 us against 775 and
        756 us without the pipeline)."""
        return _Deferred(self._pool, work).launched()

    def close(self) -> None:
        """Wait for the batches launched and end the thread."""
        self._pool.shutdown(wait=True)


class _Deferred:
    """A batch ``BatchThread.launch`` gave out: begun by ``start`` or by ``finish``."""

    __slots__ = ("_pool", "_work", "_future")

    def __init__(self, pool: ThreadPoolExecutor, work: Callable[[], list[WorkResponse]]) -> None:
        self._pool = pool
        self._work: Callable[[], list[WorkResponse]] | None = work
        self._future: Future[list[WorkResponse]] | None = None

    def launched(self) -> Launched:
        return Launched(self.finish, self.done, self.start)

    def start(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            self._future = self._pool.submit(work)

    def finish(self) -> list[WorkResponse]:
        work, self._work = self._work, None
        if work is not None:
            return work()
        assert self._future is not None
        return self._future.result()

    def done(self) -> bool:
        return self._future is not None and self._future.done()
