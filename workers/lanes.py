"""Lanes: frontend processes' own connections to a worker, beside the router's.

A worker whose model loaded listens on a Unix-domain stream socket next to the router's
channel socket (``lane-<pid>.sock``) and reports its path in ``Ready.lane``. A frontend process
connects (no hello) and sends, framed as on the router channel (``proto.framing``), ``Infer``
(one request, its own request ids: bit 63 set), ``Release`` (output blocks it has read) and
``Cancel``, and ``StreamAck`` for a decoupled model's responses. The worker answers each
``Infer`` on the lane it came from, and a decoupled model's sender sends its ``Streamed``
responses there too (from any thread: ``Outbox``). Before the worker exits it says
``LaneBye`` on every lane: what it had not answered was never executed.

Reading (``workers.inbox``): whichever thread pumps the inbox waits on the router's socket,
the listener and every lane at once (one ``select.poll`` object, each file registered once).
Lane sockets stay in blocking mode for their writer (``Outbox``: non-blocking writes, then
blocking ones, bounded here by ``SO_SNDTIMEO``) and are read with ``MSG_DONTWAIT``: a client
that sends half a message never holds the reader up. A lane whose client closes it (or that
sends garbage) stops being read at once; the main loop then drops it (``CLOSED``), freeing
the output blocks its client had not released.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
from typing import Any, Final

from shoal.proto import framing, wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.block import Block
from shoal.workers.outbox import Outbox

log = logging.getLogger("shoal.worker")

MAX_PATH: Final = 107
"""Bytes of a Unix socket path at most (``sun_path`` is 108 with its terminating NUL)."""
SEND_TIMEOUT_S: Final = 10
"""A reply that a lane's client leaves unread this long (its socket buffer full) breaks
the lane: the worker's main thread, which also serves the router, waits no longer."""
READABLE: Final = select.POLLIN | select.POLLPRI
_NOWAIT: Final = socket.MSG_DONTWAIT
_BYE_NOWAIT: Final = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_DRAIN_READS: Final = 16
"""Reads of unread requests at exit at most (a lane closed with data unread reports
ECONNRESET to its client rather than a plain end)."""

CLOSED: Final = wpb.Envelope()
"""What the inbox files for the main loop, with the lane, when a lane ended (its client
closed it, or sent something that is not a message): the main loop drops it. Compared by
identity: a client's own message without a body is another object."""
NO_FRAMES: Final[list[bytes]] = []
_NOTHING: Final[list[list[Any]]] = []


def lane_path(endpoint: str, pid: int) -> str:
    """Where a worker's lane socket goes: beside the router's channel socket."""
    return os.path.join(os.path.dirname(framing.socket_path(endpoint)), f"lane-{pid}.sock")


class Lane:
    """One frontend's connection. ``held``: output blocks of its answered requests that its
    client has not released yet (the main thread's: it answers and takes ``Release``)."""

    __slots__ = ("sock", "fd", "decoder", "outbox", "held", "dead", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = framing.Decoder(writable=True)
        self.outbox = Outbox(sock)
        self.held: set[Block] = set()
        self.dead = False
        """No longer read (its client ended it); its requests not executed yet are skipped."""
        self.closed = False
        """Dropped: socket closed, blocks freed."""

    def __repr__(self) -> str:
        return f"<lane fd {self.fd}>"


class LaneServer:
    """The lane listener and its connections; ``poller`` also watches the router's socket
    (registered by the inbox)."""

    def __init__(self, path: str, listener: socket.socket) -> None:
        self.path = path
        self.listener = listener
        self.listen_fd = listener.fileno()
        self.poller = select.poll()
        self.poller.register(self.listen_fd, READABLE)
        self.lanes: dict[int, Lane] = {}
        """By file descriptor: the lanes being read."""
        self.every: set[Lane] = set()
        """Every lane not dropped yet (those the inbox stopped reading too)."""
        self._view = memoryview(bytearray(framing.RECV_BYTES))
        """One receive buffer for every lane: reads happen under the inbox's read lock, and
        the decoder copies frames out."""
        self._said_bye = False

    @classmethod
    def open(cls, endpoint: str) -> LaneServer | None:
        """A listening lane socket; None where none can be made (a path too long for a Unix
        socket, or an error): the worker serves the router alone then."""
        path = lane_path(endpoint, os.getpid())
        if len(os.fsencode(path)) > MAX_PATH:
            log.info("no lane socket: its path would be longer than %d bytes (%s)", MAX_PATH, path)
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
            listener.setblocking(False)
        except OSError as exc:
            log.warning("no lane socket at %s: %s", path, exc)
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        return cls(path, listener)

    def accept(self) -> None:
        """Take every pending connection (the listener is non-blocking)."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of files: no more lanes (else the listener stays readable for ever)
                if self.listener.fileno() >= 0:
                    log.error("accepting a lane connection failed (%s): this worker takes no new lanes", exc)
                    self._stop_listening()
                return
            sock.setblocking(True)  # the writer's fallback blocks (bounded by SO_SNDTIMEO)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            lane = Lane(sock)
            self.lanes[lane.fd] = lane
            self.every.add(lane)
            self.poller.register(lane.fd, READABLE)

    def _stop_listening(self) -> None:
        """Close the listener and remove its socket: frontends send the requests they would
        have sent here through the router (those already connected keep their lanes)."""
        try:
            self.poller.unregister(self.listen_fd)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def read(self, lane: Lane) -> list[list[Any]] | None:
        """(the inbox's read lock held) The messages one read of ``lane`` completes (none
        when it has nothing, or part of a message); None when the lane ended."""
        view = self._view
        try:
            n = lane.sock.recv_into(view, 0, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            return _NOTHING
        except OSError:
            return None  # reset by its client, or dropped by the main thread meanwhile
        if not n:
            return None
        try:
            return lane.decoder.feed(view[:n])
        except framing.FramingError as exc:
            log.error("lane %d: %s; closing it", lane.fd, exc)
            return None

    def stop_reading(self, lane: Lane) -> None:
        """(the read lock held, or the main thread dropping it) No more reads of ``lane``."""
        lane.dead = True
        if self.lanes.get(lane.fd) is lane:
            del self.lanes[lane.fd]
            try:
                self.poller.unregister(lane.fd)
            except (KeyError, ValueError):
                pass

    def drop(self, lane: Lane) -> None:
        """(the main thread) Close ``lane``; its held blocks are the caller's to free."""
        if lane.closed:
            return
        self.stop_reading(lane)
        lane.closed = True
        self.every.discard(lane)
        lane.sock.close()

    def bye(self) -> None:
        """(exit) No new lane connections, and ``LaneBye`` on every lane, pending connections
        too (never waiting: a full socket buffer or a dead client is skipped): their clients
        send no more requests here. The lanes stay open (``close``)."""
        if self._said_bye:
            return
        self._said_bye = True
        try:
            os.unlink(self.path)  # no new connections (a frontend connecting now sends the router its request)
        except OSError:
            pass
        if self.listener.fileno() >= 0:
            self.accept()  # those that connected before
        self._stop_listening()
        bye = wire.envelope(0)
        bye.lane_bye.SetInParent()
        data = b"".join(framing.encode([bye.SerializeToString()]))
        for lane in list(self.every):
            try:
                lane.sock.send(data, _BYE_NOWAIT)
            except OSError:
                pass

    def close(self) -> None:
        """(exit) ``bye``, then close every lane and remove the socket; the requests its
        clients sent that were never read are read first (so that a client sees a plain end
        rather than a reset)."""
        self.bye()
        view = self._view
        for lane in list(self.every):
            sock = lane.sock
            try:
                for _ in range(_DRAIN_READS):  # requests never executed: read, so that the client sees a plain end
                    if not sock.recv_into(view, 0, _NOWAIT):
                        break
            except OSError:
                pass
            self.drop(lane)
