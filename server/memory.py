"""Giving freed memory back to the system.

A request of hundreds of MB passes through grpc's and aiohttp's buffers in many pieces
allocated by several threads; once the request is gone, glibc keeps those freed pieces in
its per-thread arenas, so the router's resident memory stays at its high-water mark
although nothing references it. ``Trimmer`` looks every ``interval_s`` at how many freed
bytes glibc holds (``mallinfo2``) and at the router's anonymous memory, and when either is
``threshold_bytes`` above where it should be, asks glibc to return free pages
(``malloc_trim``) in a worker thread, off the event loop. Counting the freed bytes is what
returns a burst's memory within a second of its end, whenever the last trim happened.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os

log = logging.getLogger("shoal.memory")

_PAGE = os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int:
    """Resident memory that is not file-backed or shared (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _mallinfo2() -> object:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None  # glibc older than 2.33, or not glibc
    fn.restype = _MallInfo2
    return fn


def _malloc_trim() -> object:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    """Trims when glibc holds ``threshold_bytes`` more freed bytes than it could not give back
    at the last trim, when anonymous memory is ``threshold_bytes`` above what it was after the
    last trim, and at most every ``quiet_s`` while it stays that far above its level at start.
    The threshold bounds what the router keeps after a burst: ``tests/security/test_memory.py``
    allows 48 MiB above its baseline, so it stays below that."""

    def __init__(self, *, interval_s: float = 1.0, threshold_bytes: int = 32 << 20, quiet_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.threshold_bytes = threshold_bytes
        self.quiet_s = quiet_s
        self._trim = _malloc_trim()
        self._info = _mallinfo2()
        self._task: asyncio.Task[None] | None = None
        self.trims = 0

    def start(self) -> None:
        if self._trim is not None:
            self._task = asyncio.create_task(self._run(), name="malloc trim")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        floor = last = anonymous_bytes()
        kept = self._free_held()
        last_at = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                now = anonymous_bytes()
            except OSError:
                return
            grew = now > last + self.threshold_bytes
            high = now > floor + self.threshold_bytes and loop.time() - last_at >= self.quiet_s
            if grew or high or self._free_held() > kept + self.threshold_bytes:
                await asyncio.to_thread(self._trim, 0)  # type: ignore[arg-type]
                self.trims += 1
                # what is still free now lies between chunks in use: trimming again cannot help
                last, kept, last_at = anonymous_bytes(), self._free_held(), loop.time()
                log.debug("malloc_trim: %d MiB -> %d MiB", now >> 20, last >> 20)
            else:
                last = min(last, now)

    def _free_held(self) -> int:
        """Bytes glibc holds freed in its arenas (0 where ``mallinfo2`` is missing)."""
        if self._info is None:
            return 0
        return int(self._info().fordblks)  # type: ignore[operator]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
