"""``DirectScheduler``: no batching; each request goes alone to the least busy instance."""

from __future__ import annotations

import asyncio
import time

from proto.errors import ErrorCode, ServingError
from server.dispatch.pool import InstancePool
from server.scheduling.base import wait_idle
from server.stats import ModelStats
from server.types import InferRequest, InferResult


class DirectScheduler:
    def __init__(self, pool: InstancePool, stats: ModelStats | None = None) -> None:
        self.pool = pool
        self.stats = stats
        self._inflight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def submit(self, request: InferRequest) -> InferResult:
        if self._draining:
            raise ServingError("the model is being unloaded", code=ErrorCode.UNAVAILABLE, retryable=True)
        self._inflight += 1
        self._idle.clear()
        start = time.monotonic_ns()
        ok = False
        try:
            (result,) = await self.pool.run((request,))
            ok = not isinstance(result, ServingError)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            if self.stats is not None:
                self.stats.request_done(ok, time.monotonic_ns() - start, 0)
        if isinstance(result, ServingError):
            raise result
        return result

    async def drain(self, timeout_s: float) -> None:
        self._draining = True
        await wait_idle(self._idle, timeout_s)
