"""Worker output: each worker process writes its stdout and stderr into pipes that the router
reads on its event loop (never blocking it). Every line goes on, unchanged and whole, to the
router's own stdout or stderr (so the log looks as when workers inherited them, and
``--log-file``, which is the router's stderr, still gets them), written by one thread; the
last ``RING_LINES`` lines of each instance are kept for ``shoal workers logs`` (``GET
/v2/admin/models/M/instances/I/logs``).

While more than ``HIGH_WATER`` bytes wait for that thread (the router's stderr is a pipe
nobody reads), the pipes are not read: workers then block on a full pipe, as they did on an
inherited stderr nobody read, and the router's loop goes on.

The pipes are the router's own (``os.pipe``), not asyncio's subprocess pipes: asyncio's
``Process.wait()`` waits for those to close too, and a model's child process holding them
would hide the worker's exit."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections import deque
from typing import Any, cast

RING_LINES = 1000
"""Lines kept per instance (all its processes: a crashed one's last lines stay)."""
LINE_MAX = 2048
"""Characters of one line kept in the ring (it is forwarded whole)."""
PARTIAL_MAX = 64 << 10
"""A line longer than this is forwarded (and kept) in pieces."""
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
EOF_WAIT_S = 0.5
"""How long a worker's exit waits for the end of its output (its last lines: a traceback)."""


class LogRing:
    """The last lines of one instance: ``(unix time, pid, stream, text)``."""

    __slots__ = ("lines",)

    def __init__(self, maxlen: int = RING_LINES) -> None:
        self.lines: deque[tuple[float, int, str, str]] = deque(maxlen=maxlen)

    def add(self, pid: int, stream: str, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r\n")
        if len(text) > LINE_MAX:
            text = text[:LINE_MAX] + " [...]"
        self.lines.append((time.time(), pid, stream, text))

    def as_list(self, limit: int = 0) -> list[dict[str, Any]]:
        rows = list(self.lines)
        if limit > 0:
            rows = rows[-limit:]
        return [{"time": t, "pid": pid, "stream": stream, "text": text} for t, pid, stream, text in rows]


class Forwarder:
    """One thread writing worker output to the router's descriptors 1 and 2, in the order it
    was read; reading is paused while too much waits (``HIGH_WATER``)."""

    def __init__(self, targets: dict[int, int] | None = None) -> None:
        """``targets``: where output meant for descriptor 1 and 2 goes (tests)."""
        self._targets = targets or {1: 1, 2: 2}
        self._queue: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._paused: list[tuple[asyncio.AbstractEventLoop, asyncio.ReadTransport]] = []
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._valid = {fd: _is_open(target) for fd, target in self._targets.items()}
        """A descriptor the router started without (``>&-``): that output is only kept."""

    def put(self, fd: int, data: bytes, transport: asyncio.ReadTransport) -> None:
        """Queue ``data`` for ``fd``; pauses ``transport`` when too much waits."""
        if not self._valid.get(fd, False):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-worker-output", daemon=True)
            self._thread.start()
        with self._lock:
            self._pending += len(data)
            self._idle.clear()
            if self._pending > HIGH_WATER:
                transport.pause_reading()
                self._paused.append((asyncio.get_running_loop(), transport))
        self._queue.put((fd, data))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, data = item
            fd = self._targets[fd]
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                pass  # the router's stdout/stderr is gone: the ring still has the lines
            with self._lock:
                self._pending -= len(data)
                resume: list[tuple[asyncio.AbstractEventLoop, asyncio.ReadTransport]] = []
                if self._paused and self._pending <= LOW_WATER:
                    resume, self._paused = self._paused, []
                if self._pending == 0:
                    self._idle.set()
            for loop, transport in resume:
                try:
                    loop.call_soon_threadsafe(_resume, transport)
                except RuntimeError:
                    pass  # that loop is closed

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until everything queued is written (blocking; at shutdown)."""
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Stop the thread once the queue is written (tests; the process's one never stops)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(5)
            self._thread = None


def _resume(transport: asyncio.ReadTransport) -> None:
    if not transport.is_closing():
        transport.resume_reading()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


FORWARDER = Forwarder()
"""The process's one forwarder (descriptors 1 and 2 are the process's)."""


class _Reader(asyncio.Protocol):
    """One pipe of one worker process: lines to the ring and on to ``fd``."""

    def __init__(
        self, ring: LogRing, pid: int, stream: str, fd: int, done: asyncio.Future[None], forwarder: Forwarder
    ) -> None:
        self.forwarder = forwarder
        self.ring = ring
        self.pid = pid
        self.stream = stream
        self.fd = fd
        self.done = done
        self.partial = b""
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.ReadTransport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        buf = self.partial + data if self.partial else data
        cut = buf.rfind(b"\n") + 1
        if len(buf) - cut > PARTIAL_MAX:
            cut = len(buf)
        self.partial = buf[cut:]
        if cut:
            self._emit(buf[:cut])

    def _emit(self, chunk: bytes) -> None:
        assert self.transport is not None
        self.forwarder.put(self.fd, chunk, self.transport)
        lines = chunk.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for line in lines:
            self.ring.add(self.pid, self.stream, line)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = b""
        if not self.done.done():
            self.done.set_result(None)


async def _connect(loop: asyncio.AbstractEventLoop, reader: _Reader, pipe: Any) -> asyncio.ReadTransport:
    transport, _ = await loop.connect_read_pipe(lambda: reader, pipe)
    return transport


class Capture:
    """The stdout and stderr pipes of one worker process: ``open()`` before spawning it (the
    child gets the descriptors it returns), ``await start(ring, pid)`` after, ``abort()``
    when it did not start."""

    def __init__(self, forwarder: Forwarder | None = None) -> None:
        self.forwarder = forwarder or FORWARDER
        self.child_fds: tuple[int, int] = (-1, -1)
        self._read_fds: tuple[int, int] = (-1, -1)
        self._transports: list[asyncio.ReadTransport] = []
        self._done: list[asyncio.Future[None]] = []

    def open(self) -> tuple[int, int]:
        """Make the pipes; returns the descriptors the child writes to (stdout, stderr)."""
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError:
            os.close(out_r)
            os.close(out_w)
            raise
        self._read_fds = (out_r, err_r)
        self.child_fds = (out_w, err_w)
        return self.child_fds

    def _close_child_fds(self) -> None:
        for fd in self.child_fds:
            if fd >= 0:
                os.close(fd)
        self.child_fds = (-1, -1)

    def abort(self) -> None:
        """The process did not start: close every descriptor."""
        self._close_child_fds()
        for fd in self._read_fds:
            if fd >= 0:
                os.close(fd)
        self._read_fds = (-1, -1)

    async def start(self, ring: LogRing, pid: int) -> None:
        """Read the pipes of the started process ``pid`` into ``ring`` (and forward them)."""
        self._close_child_fds()
        loop = asyncio.get_running_loop()
        fds, self._read_fds = self._read_fds, (-1, -1)
        for i, (fd, stream, target) in enumerate(zip(fds, ("stdout", "stderr"), (1, 2), strict=True)):
            done: asyncio.Future[None] = loop.create_future()
            try:
                pipe = os.fdopen(fd, "rb", buffering=0)
            except OSError:
                for rest in fds[i:]:
                    os.close(rest)
                raise
            try:
                transport = await _connect(loop, _Reader(ring, pid, stream, target, done, self.forwarder), pipe)
            except BaseException:
                pipe.close()
                for rest in fds[i + 1 :]:
                    os.close(rest)
                raise
            self._transports.append(transport)
            self._done.append(done)

    @property
    def ended(self) -> bool:
        return all(d.done() for d in self._done)

    async def wait_ended(self, timeout_s: float = EOF_WAIT_S) -> None:
        """Wait (at most ``timeout_s``) for both pipes to end: the process has exited, and
        no child of it holds them."""
        if self._done:
            await asyncio.wait(self._done, timeout=timeout_s)

    def close(self) -> None:
        """Stop reading (a model's child process still holds the pipes)."""
        for transport in self._transports:
            transport.close()
        self.abort()
