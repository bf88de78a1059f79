"""``DirectScheduler``: no batching; each request goes alone to the least busy instance."""

from __future__ import annotations

import time

from shoal.proto.errors import ServingError
from shoal.server.dispatch.pool import InstancePool
from shoal.server.scheduling.base import SchedulerBase
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult


class DirectScheduler(SchedulerBase):
    def __init__(self, pool: InstancePool, stats: ModelStats | None = None) -> None:
        self.pool = pool
        self.stats = stats
        super().__init__()

    async def submit(self, request: InferRequest) -> InferResult:
        self._admission.check()
        self._admission.enter()
        start = time.monotonic_ns()
        ok = False
        try:
            (result,) = await self.pool.run((request,))
            ok = not isinstance(result, ServingError)
        finally:
            self._admission.leave()
            if self.stats is not None:
                self.stats.request_done(ok, time.monotonic_ns() - start, 0)
        if isinstance(result, ServingError):
            try:
                raise result
            finally:
                del result  # the error's traceback holds this frame: no cycle through the local
        return result
