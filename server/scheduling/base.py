"""The scheduler interface: how a model version turns requests into worker batches.

One scheduler per loaded model version, owned by the router's event loop. The default
scheduler sends each request alone; the dynamic batcher, sequence batcher and ensemble
scheduler implement the same protocol, so the data plane never special-cases them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.types import InferRequest, InferResult


class Scheduler(Protocol):
    async def submit(self, request: InferRequest) -> InferResult:
        """Run one request to completion; raises ``ServingError``.

        The caller owns the returned result and must call ``result.done()`` once encoded.
        """
        ...

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet answered (queued + executing)."""
        ...

    @property
    def pending(self) -> int:
        """Requests accepted and not yet executing."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (new submits fail ``UNAVAILABLE``) and wait up to ``timeout_s``
        for in-flight requests to finish."""
        ...


class Admission:
    """The part every scheduler shares: counts requests in flight, refuses new ones once
    draining, and lets ``drain`` wait for the last one."""

    def __init__(self) -> None:
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def check(self) -> None:
        """Raise ``UNAVAILABLE`` when the model is being unloaded."""
        if self.draining:
            raise ServingError("the model is being unloaded", code=ErrorCode.UNAVAILABLE)

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; wait up to ``timeout_s`` until nothing is in flight."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return


class SchedulerBase:
    """What the schedulers share: ``inflight``, ``drain`` and their ``Admission``."""

    def __init__(self) -> None:
        self._admission = Admission()

    @property
    def inflight(self) -> int:
        return self._admission.inflight

    @property
    def pending(self) -> int:
        """Requests received and not yet executing (queued)."""
        return 0

    async def drain(self, timeout_s: float) -> None:
        await self._admission.drain(timeout_s)
