"""The scheduler interface: how a model version turns requests into worker batches.

One scheduler per loaded model version, owned by the router's event loop. The default
scheduler sends each request alone; the dynamic batcher, sequence batcher and ensemble
scheduler implement the same protocol, so the data plane never special-cases them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from server.types import InferRequest, InferResult


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

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (new submits fail ``UNAVAILABLE``) and wait up to ``timeout_s``
        for in-flight requests to finish."""
        ...


async def wait_idle(idle: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``idle`` is set or ``timeout_s`` passes (the shared part of ``drain``)."""
    deadline = time.monotonic() + timeout_s
    while not idle.is_set():
        try:
            await asyncio.wait_for(idle.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return
