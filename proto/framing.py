"""Router <-> worker messages on a Unix-domain stream socket: length-prefixed multipart frames.

A message is ``[header, *buffers]`` (``proto.wire``: a serialized ``Envelope`` and the inline
tensor bytes it names). On the stream it is::

    u32 size       bytes that follow this 8-byte head
    u32 count      number of frames (>= 1)
    u32 length[count]
    frame bytes, one after the other

all little-endian. A worker's first message on a connection is ``[HELLO, identity]``; after it
the router routes that connection's messages to the identity's handler.

DESIGN (issue 15): this replaced ZeroMQ (ROUTER/DEALER over ``ipc://``). Measured with
``scripts/bench_channel.py`` (echo worker, 100-byte header + 64-byte frame, uvloop router):
on the 2-core dev box ZeroMQ took 118 us per c=1 round trip and 18-19 us of router CPU per
message at c=16 (49-55k msg/s); this stream 55 us, 6.2-6.5 us and 152-160k msg/s. A ZeroMQ
round trip wakes libzmq's I/O thread on both sides besides the two Python threads; here the
router's event loop reads the socket itself and a worker blocks in ``recv``.

``Connection`` is the blocking end (workers, test fakes); the router's end is an asyncio
protocol built on ``Decoder`` (``server/dispatch/channel.py``).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any, Final

HEAD: Final = struct.Struct("<II")
HELLO: Final = b"shoal-worker/1"
MAX_FRAMES: Final = 1 << 16
MAX_MESSAGE_BYTES: Final = 1 << 31
"""A bigger size means a broken peer: the connection is closed. Inline frames are at most
``--inline-max-bytes`` each; large tensors travel in shared memory."""


def fits_inline(frames: Sequence[Any], nbytes: int) -> bool:
    """Whether a frame of ``nbytes`` more keeps a message of ``frames`` well within
    ``MAX_MESSAGE_BYTES`` (a MiB left for its header): a large tensor for which an arena has
    no room (full, or smaller than the tensor) then travels in the message instead, a copy
    more on each side but served, as Triton serves it."""
    held = sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)
    return held + nbytes <= MAX_MESSAGE_BYTES - (1 << 20)


_overflowed = False


def overflow(frames: Sequence[Any], nbytes: int, refused: Exception, what: str) -> None:
    """An arena refused a tensor of ``nbytes`` (``refused``): it goes in the message of
    ``frames`` instead (``fits_inline``), or ``refused`` is raised when the message cannot
    carry it either. The first one is logged, once per process (a small /dev/shm would log
    every large tensor)."""
    global _overflowed
    if not fits_inline(frames, nbytes):
        raise refused
    if not _overflowed:
        _overflowed = True
        logging.getLogger("shoal").warning(
            "%s of %d bytes went in the message, a copy more: %s (logged once)", what, nbytes, refused
        )


IOV_MAX: Final = 1024
"""Buffers one ``sendmsg`` takes at most (Linux's UIO_MAXIOV)."""

RECV_BYTES: Final = 1 << 18
"""A worker's receive buffer (bigger messages arrive over several reads)."""


class FramingError(Exception):
    """The peer sent something that is not a message of this protocol."""


def socket_path(endpoint: str) -> str:
    """The filesystem path of an endpoint (``ipc://`` and ``unix://`` prefixes accepted)."""
    for prefix in ("ipc://", "unix://"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix) :]
    return endpoint


def encode(frames: Sequence[Any]) -> list[Any]:
    """The buffers to write for one message (the frames themselves are not copied)."""
    n = len(frames)
    lens = [len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames]
    head = struct.pack(f"<II{n}I", 4 * n + sum(lens), n, *lens)
    return [head, *frames]


def _check(size: int, count: int) -> None:
    if count < 1 or count > MAX_FRAMES or size > MAX_MESSAGE_BYTES or size < 4 * count:
        raise FramingError(f"bad message head: {size} bytes, {count} frames")


class Decoder:
    """Splits a byte stream into messages (lists of ``bytes`` frames; ``bytearray`` frames when
    ``writable``: a worker hands them to models as numpy arrays, which DLPack refuses to export
    when read-only).

    A message that arrives in many reads (a large inline tensor: hundreds of MiB when an arena
    has no room for it) is kept as a list of the reads' bytes until all of it is there, then
    joined once, and its frames are copied out of a view of it (before: each read appended to
    one ``bytearray``, each frame sliced out of it, a copy, and copied again into ``bytes``).
    In 256 KiB reads on the 2-core box (``scripts/bench_framing.py --base``, best of 3,
    four trials): 300 MiB 515-574 ms before, 465-490 ms since; 16 MiB and small messages the
    same. Medians on either side reach 0.7-2.6 s in some trials (this VM's fresh memory is
    slow to touch), so the gain is about 10%, not more."""

    __slots__ = ("_parts", "_have", "_need", "_frame")

    def __init__(self, *, writable: bool = False) -> None:
        self._parts: list[bytes] = []
        """The reads of the message not yet complete (copies)."""
        self._have = 0
        self._need = 0
        """Bytes the pending message needs in all (0: its head has not come yet)."""
        self._frame: type[bytes] | type[bytearray] = bytearray if writable else bytes

    def feed(self, data: bytes | memoryview) -> list[list[Any]]:
        """Messages completed by ``data``; raises ``FramingError`` on a malformed head. The
        frames are copies: ``data`` may be reused once this returns."""
        buf: bytes | memoryview
        if self._parts:
            have = self._have + len(data)
            if have < self._need or (not self._need and have < 8):
                self._parts.append(bytes(data))
                self._have = have
                return []
            parts = self._parts
            buf = parts[0] + data if len(parts) == 1 else b"".join([*parts, data])  # one copy of ``data``
            self._parts, self._have, self._need = [], 0, 0
        else:
            buf = data
        out: list[list[Any]] = []
        frame = self._frame
        pos, end = 0, len(buf)
        unpack = HEAD.unpack_from
        with memoryview(buf) as view:
            while end - pos >= 8:
                size, count = unpack(view, pos)
                _check(size, count)
                stop = pos + 8 + size
                if stop > end:
                    break
                lens = struct.unpack_from(f"<{count}I", view, pos + 8)
                p = pos + 8 + 4 * count
                frames = []
                for n in lens:
                    frames.append(frame(view[p : p + n]))
                    p += n
                if p != stop:
                    raise FramingError(f"frame lengths add up to {p - pos - 8} bytes, the head says {size}")
                out.append(frames)
                pos = stop
            if pos < end:  # the start of a message: kept until the rest comes
                rest = bytes(view[pos:])
                self._parts, self._have = [rest], len(rest)
                if len(rest) >= 8:
                    size, count = unpack(rest, 0)
                    _check(size, count)
                    self._need = 8 + size
        return out


def send_rest(sock: socket.socket, bufs: Sequence[Any], sent: int) -> None:
    """Write what is left of ``bufs`` after their first ``sent`` bytes with ``sendmsg``, none
    of them copied (blocking; a large tensor's frame can be hundreds of MiB)."""
    views: list[memoryview] = []
    for b in bufs:
        view = memoryview(b)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        views.append(view[sent:] if sent else view)
        sent = 0
    first = 0
    while first < len(views):
        n = sock.sendmsg(views[first : first + IOV_MAX])
        while first < len(views) and n >= views[first].nbytes:
            n -= views[first].nbytes
            first += 1
        if n:
            views[first] = views[first][n:]


class Connection:
    """The blocking end of a channel connection (a worker's)."""

    def __init__(self, endpoint: str, identity: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path(endpoint))
        self._decoder = Decoder(writable=True)
        self._ready: list[list[Any]] = []
        self._rview: memoryview | None = None
        self.send([HELLO, identity])

    def send(self, frames: Sequence[Any]) -> None:
        """Write one message (all of it: blocks while the router does not read)."""
        bufs = encode(frames)
        total = sum(len(b) if not isinstance(b, memoryview) else b.nbytes for b in bufs)
        sent = self.sock.sendmsg(bufs)
        if sent < total:  # the kernel took part of it
            send_rest(self.sock, bufs, sent)

    def _read(self) -> bool:
        """Decode what one ``recv`` brings (blocks until something arrives); False at the end.
        It lands in one buffer kept for the connection's life: ``sock.recv(n)`` would
        allocate (mmap, mremap, munmap) a fresh ``n``-byte object for every message."""
        view = self._rview
        if view is None:
            view = self._rview = memoryview(bytearray(RECV_BYTES))
        n = self.sock.recv_into(view)
        if not n:
            return False
        self._ready.extend(self._decoder.feed(view[:n]))  # frames are copies: the buffer is reused
        return True

    @property
    def decoded(self) -> list[list[Any]]:
        """Messages read and decoded, not taken yet (a read may bring several)."""
        return self._ready

    def fill(self) -> bool:
        """One read (blocks until something arrives), its messages added to ``decoded``;
        False at the end (for callers that wait on the socket themselves)."""
        return self._read()

    def recv(self) -> list[bytes]:
        """The next message; raises ``EOFError`` when the router has closed the connection."""
        while not self._ready:
            if not self._read():
                raise EOFError("the router closed the connection")
        return self._ready.pop(0)

    def poll(self, timeout_ms: int) -> bool:
        """A message can be received without blocking (or the connection closed)."""
        if self._ready:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout_ms / 1000)
        if not readable:
            return False
        if not self._read():
            return True  # recv() will raise EOFError
        return bool(self._ready) or self.poll(0)

    def close(self) -> None:
        self.sock.close()
