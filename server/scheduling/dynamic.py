"""``DynamicBatcher``: Triton's dynamic batcher on the router's loop. Requests wait in a
``BatchQueue`` (the policy); a batch is formed when an instance is free, and goes to the
pool as a list of per-request descriptors: the worker gathers and scatters, the router
copies no tensor bytes to form it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.dispatch.pool import InstancePool
from shoal.server.scheduling.base import SchedulerBase
from shoal.server.scheduling.batchqueue import BatchConfig, BatchQueue, Item
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult

Clock = Callable[[], int]


def _uint_param(request: InferRequest, name: str) -> int:
    value = request.parameters.get(name, 0)
    if type(value) is not int or value < 0:
        raise InvalidInput(f"request parameter '{name}' must be a non-negative integer")
    return value


class DynamicBatcher(SchedulerBase):
    def __init__(
        self, pool: InstancePool, config: mc.ModelConfig, stats: ModelStats, clock: Clock = time.monotonic_ns
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.clock = clock
        self.queue = BatchQueue(BatchConfig.from_config(config))
        self._ragged = frozenset(i.name for i in config.input if i.allow_ragged_batch)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executing = 0
        self._batches: set[asyncio.Future[None]] = set()
        super().__init__()
        self._last_delivery: asyncio.Future[None] | None = None
        self._queue_ns: dict[int, int] = {}
        """Queue time of each dispatched request (by ``id`` of its item), for statistics."""

    @property
    def pending(self) -> int:
        return len(self.queue)

    def _shape_key(self, request: InferRequest) -> tuple[Any, ...]:
        return tuple(sorted((t.name, t.shape[1:]) for t in request.inputs if t.name not in self._ragged))

    async def submit(self, request: InferRequest) -> InferResult:
        self._admission.check()
        level = self.queue.level_of(_uint_param(request, "priority"))
        timeout_us = _uint_param(request, "timeout")
        start = self.clock()
        fut: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        item = Item(
            payload=(request, fut),
            size=request.batch_size,
            shape_key=self._shape_key(request),
            enqueued_ns=0,
            request_id=request.id,
        )
        item.level = level
        try:
            self.queue.add(item, start, timeout_us)
        except ServingError:
            self.stats.request_done(False, self.clock() - start, 0)
            raise
        self._admission.enter()
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())
        self._wake.set()
        ok = False
        try:
            result = await fut
            ok = True
            return result
        except asyncio.CancelledError:
            self.queue.remove(item)  # still queued: it never runs; executing: the pool cleans up
            raise
        finally:
            self._admission.leave()
            self.stats.request_done(ok, self.clock() - start, self._queue_ns.pop(id(item), 0))
            # a future that failed holds the error, whose traceback holds this frame
            del fut, item

    async def _loop(self) -> None:
        queue = self.queue
        while True:
            now = self.clock()
            for item in queue.expire(now):
                _, fut = item.payload
                if not fut.done() and item.error is not None:
                    fut.set_exception(item.error)
            wake_at = 0
            capacity = max(1, self.pool.ready_count) - self._executing
            if capacity > 0:
                batch, wake_at = queue.next_batch(now)
                if batch:
                    self._executing += 1
                    for item in batch:
                        self._queue_ns[id(item)] = now - item.enqueued_ns
                    task = asyncio.ensure_future(self._run(batch))
                    self._batches.add(task)  # the loop holds only weak references to tasks
                    task.add_done_callback(self._batches.discard)
                    continue
            deadline = queue.next_deadline()
            times = [t for t in (wake_at, deadline) if t]
            self._wake.clear()
            try:
                if times:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, (min(times) - now) / 1e9))
                else:
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _run(self, batch: list[Item]) -> None:
        requests = [item.payload[0] for item in batch]
        prev, mine = None, None
        if self.queue.config.preserve_ordering:
            prev = self._last_delivery
            mine = asyncio.get_running_loop().create_future()
            self._last_delivery = mine
        try:
            try:
                results: list[InferResult | ServingError] = await self.pool.run(requests)
            except ServingError as exc:
                results = [exc.with_traceback(None)] * len(requests)  # shared: holds no frame
            except Exception as exc:  # noqa: BLE001 - a bug must not strand the requests
                results = [ServingError(f"batch failed: {exc!r}")] * len(requests)
        finally:
            self._executing -= 1
            self._wake.set()
        if prev is not None:
            await prev
        for item, res in zip(batch, results, strict=True):
            fut = item.payload[1]
            if fut.done():  # the client went away
                if isinstance(res, InferResult):
                    res.done()
                continue
            if isinstance(res, ServingError):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if mine is not None:
            mine.set_result(None)

    async def drain(self, timeout_s: float) -> None:
        await super().drain(timeout_s)
        for item in self.queue.drain_all():
            fut = item.payload[1]
            if not fut.done():
                fut.set_exception(ServingError("the model was unloaded", code=ErrorCode.UNAVAILABLE))
        if self._task is not None:
            self._task.cancel()
