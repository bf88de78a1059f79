"""``Outbox``: a worker's messages to the router, from any thread, each written whole and in
order.

``send`` returns once its message is written to the socket, as ``framing.Connection.send``
does (a model that exits right after ``sender.send`` has had its response delivered, as in
Triton, whose response sender waits for the server).

DESIGN: the threads of a decoupled model send at once, and any lock they all take for every
response turns into a convoy: the thread woken to take the lock gets it before the thread
holding the GIL asks for it again, which then blocks and hands the GIL over, and so on. Before
this module, sends held one ``RLock`` around ``sendmsg`` (which gives the GIL up):
``scripts/bench_worker loop`` (``repeat``'s sending loop in one process, 2-core dev box) took
19-22 us of CPU per response with one thread, 43-53 us with 4 and 49-61 us with 16, 2.3-3.6
thread switches per response (a shared ``RLock`` around a tiny section alone makes a loop of
four threads six times slower). Now 16-17 us whatever the number of threads, 0.4 switches
(this module and a leaner response path). Nothing here blocks on a lock shared by the senders:

- A message up to ``JOIN_MAX`` bytes is joined into one buffer and written with a
  non-blocking ``send`` called through ``ctypes.PyDLL``, which keeps the GIL for the system
  call, under a lock that is only ever *tried*. Nothing in that section gives the GIL up, so
  another sender finds the lock taken only when the interpreter switched threads inside it.
- A sender that finds it taken queues its message and waits on a lock of its own; whoever
  leaves the section next (or the sender itself, if it can take the lock) writes every queued
  message, in order, with one system call, and wakes their senders.
- When the socket's buffer is full (the router is behind), the rest of a message is written
  with an ordinary blocking write, the section held, the GIL released; senders queue
  meanwhile. A larger message (big inline tensors) is written from its own buffers with
  ``sendmsg`` (no copy), the same way.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from shoal.proto import framing

_FLAGS: Final = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
JOIN_MAX: Final = 1 << 16
"""Messages up to this size are joined into one buffer and written while keeping the GIL;
bigger ones (large inline tensors) are written from their buffers with ``sendmsg``, no copy."""
IOV_MAX: Final = framing.IOV_MAX
_AGAIN: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
Send = Callable[[int, bytes, int, int], int]


def _gil_send() -> Send | None:
    """libc's ``send``, called with the GIL held; None where ctypes cannot load it."""
    try:
        fn = ctypes.PyDLL(None, use_errno=True).send
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_ssize_t
    return fn


_GIL_SEND: Final = _gil_send()


@functools.lru_cache(maxsize=64)
def _head_struct(count: int) -> struct.Struct:
    return struct.Struct(f"<II{count}I")


def encode(frames: Sequence[Any]) -> list[Any]:
    """One message as ``framing.encode`` frames it: one buffer (``bytes``) up to ``JOIN_MAX``
    bytes, else the head and the frames themselves."""
    lens = [f.nbytes if f.__class__ is memoryview else len(f) for f in frames]
    size = 4 * len(lens) + sum(lens)
    head = _head_struct(len(lens)).pack(size, len(lens), *lens)
    if size < JOIN_MAX:
        return [b"".join((head, *frames))]
    return [head, *frames]


def encode_joined(frames: Sequence[Any]) -> bytes:
    """One message, framed as ``encode`` frames it, in one ``bytes`` whatever its size (a
    message written just ahead of another: ``Outbox.send``'s ``before``)."""
    return b"".join(encode(frames))


def _size(bufs: list[Any]) -> int:
    return sum(b.nbytes if b.__class__ is memoryview else len(b) for b in bufs)


class _Queued:
    """A message a sender queued, the lock it waits on, and the error if it was not written."""

    __slots__ = ("bufs", "waiter", "error")

    def __init__(self, bufs: list[Any]) -> None:
        self.bufs = bufs
        self.waiter = threading.Lock()
        self.waiter.acquire()
        self.error: OSError | None = None


class Outbox:
    """The sending half of a worker's channel connection (``sock``, a blocking socket)."""

    __slots__ = ("_sock", "_send", "_mu", "_owner", "_queue", "_error", "direct", "queued", "writes")

    def __init__(self, sock: socket.socket, *, gil_send: bool = True) -> None:
        self._sock = sock
        self._send: Send | None = _GIL_SEND if gil_send else None
        """None: ``socket.send`` (it releases the GIL: correct, slower with many senders)."""
        self._mu = threading.Lock()
        """Held while writing; only ever tried (``acquire(False)``)."""
        self._owner = 0
        """The thread holding ``_mu`` (a send from it while it writes, such as a finalizer the
        garbage collector runs, is queued and written by it right after)."""
        self._queue: deque[_Queued] = deque()
        """Messages of the senders that found ``_mu`` taken, in order."""
        self._error: OSError | None = None
        self.direct = 0
        """Messages written by their own sender (statistics)."""
        self.queued = 0
        """Messages written by another thread (statistics)."""
        self.writes = 0
        """Writes of queued messages (statistics: ``queued / writes`` messages a write)."""

    def send(self, frames: Sequence[Any], before: bytes = b"") -> None:
        """Write one message (``[header, *buffers]``) and return once it is written; raises
        ``OSError`` when the connection is broken. ``before``: a message already encoded
        (``encode``, small) written just ahead of it, in the same write (no ``frames``: that
        message alone)."""
        bufs = encode(frames) if frames else []
        if before:
            bufs = [before + bufs[0]] if len(bufs) == 1 else [before, *bufs]
        mu = self._mu
        if mu.acquire(False):
            try:
                self._owner = threading.get_ident()
                if self._queue:
                    self._write_queued()  # they were queued first
                if self._error is not None:
                    raise _copy(self._error)
                self._write(bufs)
                self.direct += 1
            finally:
                self._owner = 0
                mu.release()
            if self._queue:  # queued while this thread wrote: it writes them unless another does
                self._help()
            return
        item = _Queued(bufs)
        self._queue.append(item)
        if self._owner == threading.get_ident():
            return  # sent from inside this thread's own write: written as soon as that ends
        self._help()
        item.waiter.acquire()  # released once the message is written (or the connection broke)
        if item.error is not None:
            raise _copy(item.error)

    def _help(self) -> None:
        """Write the queued messages if no other thread is writing."""
        mu = self._mu
        while self._queue and mu.acquire(False):
            try:
                self._owner = threading.get_ident()
                self._write_queued()
            finally:
                self._owner = 0
                mu.release()

    def _write_queued(self) -> None:
        """(``_mu`` held) Write every queued message with one write, then wake their senders."""
        queue = self._queue
        items = []
        while queue:
            items.append(queue.popleft())
        if not items:
            return  # another thread wrote them between the caller's look and its lock
        err = self._error
        if err is None:
            try:
                if len(items) == 1:
                    self._write(items[0].bufs)
                elif all(len(item.bufs) == 1 for item in items):
                    self._write([b"".join([item.bufs[0] for item in items])])
                else:  # large messages among them: one after the other, no copy
                    for item in items:
                        self._write(item.bufs)
                self.writes += 1
                self.queued += len(items)
            except OSError as exc:
                err = exc
        for item in items:
            item.error = err
            item.waiter.release()

    def _write(self, bufs: list[Any]) -> None:
        """(``_mu`` held) Write a message (``encode``): one buffer at once while keeping the
        GIL when the socket takes it all, else (or a large message) with blocking writes."""
        if len(bufs) > 1:
            self._write_large(bufs)
            return
        data = bufs[0]
        size = len(data)
        send = self._send
        if send is not None:
            sent = send(self._sock.fileno(), data, size, _FLAGS)  # -1 once closed: EBADF, never another file
            if sent == size:
                return
            if sent < 0:
                code = ctypes.get_errno()
                if code not in _AGAIN:
                    self._error = OSError(code, f"writing to the router: {errno.errorcode.get(code, code)}")
                    raise _copy(self._error)
                sent = 0
        else:
            sent = 0
        try:
            self._sock.sendall(memoryview(data)[sent:] if sent else data)
        except OSError as exc:
            self._error = exc
            raise

    def _write_large(self, bufs: list[Any]) -> None:
        """(``_mu`` held) One ``sendmsg`` of the buffers; the rest buffer by buffer when the
        kernel takes part of them (or there are more than ``IOV_MAX``)."""
        try:
            sent = self._sock.sendmsg(bufs) if len(bufs) <= IOV_MAX else 0
            if sent < _size(bufs):
                framing.send_rest(self._sock, bufs, sent)
        except OSError as exc:
            self._error = exc
            raise


def _copy(exc: OSError) -> OSError:
    return type(exc)(*exc.args)
