"""Busy polling (``--busy-poll-us``): after a request arrives and after an answer comes back
from a worker, the event loop keeps polling its sockets without sleeping for that long, so
that the answer and the client's next request are read without waking an idle process.

DESIGN: at one request in flight, every hop of a request wakes a process that slept in
``epoll_wait``; on the device machine's VMs such a process runs the same Python at about half
speed and wakes tens of microseconds late (README, "Where the c=1 time goes"). A callback that
re-arms itself with ``call_soon`` until a deadline makes the loop poll with a zero timeout
(asyncio and uvloop alike) instead of sleeping. Off (0) by default: it spends a core per
process while requests keep coming. Measured on the device machine (three alternating rounds,
400 us against off): small HTTP c=1 p50 0.398 against 0.517 ms with 4 frontend processes, 0.406
against 0.525 with the router alone; gRPC c=1 unchanged then (grpc.aio's requests were read on
an EventEngine thread, which sleeps inside gRPC's core); with that listener off (``grpcenv``:
the poller thread reads them) gRPC c=1 p50 0.584 against 0.772 ms (4 frontends, three rounds,
2026-12-03). Each turn yields the core
(``sched_yield``) to a process that has work on it (added after those runs; on the 2-core box
busy polling without it cost up to a fifth of the c=16 throughput in one run). Another thread of this process
waiting for the GIL (a ``to_thread`` job) may wait a switch interval for each turn while the
loop spins: the loop takes the GIL back at once after each poll.
"""

from __future__ import annotations

import asyncio
import os
import time


class BusyPoll:
    """One per process (``BUSY``): ``kick()`` on traffic; ``configure`` once at start."""

    __slots__ = ("ns", "deadline", "armed", "loop")

    def __init__(self) -> None:
        self.ns = 0
        self.deadline = 0
        self.armed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def configure(self, us: int) -> None:
        """Poll for ``us`` microseconds after each kick (0: never), on the running loop."""
        self.ns = max(0, us) * 1000
        self.loop = asyncio.get_running_loop() if us > 0 else None
        self.armed = False  # a callback armed on an earlier loop never runs again

    def kick(self) -> None:
        if not self.ns:
            return
        self.deadline = time.monotonic_ns() + self.ns
        if not self.armed:
            self.armed = True
            self.loop.call_soon(self._spin)  # type: ignore[union-attr]

    def _spin(self) -> None:
        if time.monotonic_ns() < self.deadline:
            os.sched_yield()  # a process that has work on this core runs first
            self.loop.call_soon(self._spin)  # type: ignore[union-attr]
        else:
            self.armed = False


BUSY = BusyPoll()
"""The process's one instance (the router's, or a frontend process's)."""
