"""``WorkerChannel``: the router's end of its workers' connections, driven by the event loop.

Workers connect to one Unix-domain stream socket in the run directory and name themselves
with their first message (``proto.framing``: ``[HELLO, identity]``); after that each
connection's messages are parsed and handed to the handler registered for that identity.
Owned by the router's event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from shoal.proto import framing, wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.busypoll import BUSY

log = logging.getLogger("shoal.channel")

Handler = Callable[[wpb.Envelope, list[bytes]], None]
Service = Callable[[bytes, wpb.Envelope, list[bytes]], None]

_BACKLOG = 4096


class _Conn(asyncio.Protocol):
    """One worker connection: no identity until its hello arrives."""

    __slots__ = ("channel", "transport", "identity", "decoder", "outbox")

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel
        self.transport: Any = None
        self.identity: bytes | None = None
        self.decoder = framing.Decoder()
        self.outbox: list[Any] = []
        """Buffers sent during this loop turn, written together at its end."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        BUSY.kick()
        try:
            messages = self.decoder.feed(data)
        except framing.FramingError as exc:
            log.error("worker %r: %s; closing its connection", self.identity, exc)
            self.transport.abort()
            return
        for frames in messages:
            if self.identity is None:
                if len(frames) != 2 or frames[0] != framing.HELLO:
                    log.error("a connection did not start with a worker hello; closed")
                    self.transport.abort()
                    return
                self.identity = frames[1]
                self.channel._connected(self)
                continue
            self.channel._deliver(self.identity, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.identity is not None:
            self.channel._disconnected(self)


class WorkerChannel:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._path = framing.socket_path(endpoint)
        self._handlers: dict[bytes, Handler] = {}
        self.models: dict[bytes, str] = {}
        """The model each registered worker serves (for services that act per model)."""
        self._conns: dict[bytes, _Conn] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._starting: asyncio.Task[asyncio.AbstractServer] | None = None
        self._unflushed: list[_Conn] = []
        self.services: dict[str, Service] = {}
        """Message kinds a worker sends to the router as a whole (BLS calls, custom metrics)
        rather than to its own supervisor: kind -> handler(identity, envelope, frames)."""
        self.on_disconnect: list[Callable[[bytes], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind and listen now (workers may connect at once); serve from the running loop."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._path)
            os.chmod(self._path, 0o600)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop = loop = asyncio.get_running_loop()
        self._starting = loop.create_task(loop.create_unix_server(lambda: _Conn(self), sock=sock))
        self._starting.add_done_callback(self._serving)

    def _serving(self, task: asyncio.Task[asyncio.AbstractServer]) -> None:
        self._starting = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("the worker channel could not start serving: %r", task.exception())
            return
        self._server = task.result()

    def register(self, identity: bytes, handler: Handler, model: str = "") -> None:
        self._handlers[identity] = handler
        if model:
            self.models[identity] = model

    def unregister(self, identity: bytes) -> None:
        self._handlers.pop(identity, None)
        self.models.pop(identity, None)

    def send(self, identity: bytes, env: wpb.Envelope, buffers: Sequence[Any] = ()) -> None:
        """Queue a message for a worker; raises ``UNAVAILABLE`` if it is not connected."""
        conn = self._conns.get(identity)
        if conn is None or conn.transport.is_closing():
            raise ServingError("the model instance is not connected (it is restarting)", code=ErrorCode.UNAVAILABLE)
        # Written at the end of this loop turn, with whatever else goes to that worker in the
        # same turn: one system call for many requests, and one wake-up of the worker.
        if not conn.outbox:
            if not self._unflushed:
                assert self._loop is not None
                self._loop.call_soon(self._flush)
            self._unflushed.append(conn)
        conn.outbox.extend(framing.encode([env.SerializeToString(), *buffers]))

    def _flush(self) -> None:
        conns, self._unflushed = self._unflushed, []
        for conn in conns:
            out, conn.outbox = conn.outbox, []
            if not conn.transport.is_closing():
                conn.transport.writelines(out)

    def _connected(self, conn: _Conn) -> None:
        assert conn.identity is not None
        old = self._conns.get(conn.identity)
        if old is not None and old is not conn:
            log.warning("worker %r connected again; its earlier connection is closed", conn.identity)
            old.identity = None
            old.transport.abort()
        self._conns[conn.identity] = conn

    def _disconnected(self, conn: _Conn) -> None:
        if self._conns.get(conn.identity) is conn:  # type: ignore[arg-type]
            del self._conns[conn.identity]  # type: ignore[arg-type]
            for forget in self.on_disconnect:
                forget(conn.identity)  # type: ignore[arg-type]

    def _deliver(self, identity: bytes, frames: list[bytes]) -> None:
        handler = self._handlers.get(identity)
        if handler is None:
            log.debug("message from unknown worker %r dropped", identity)
            return
        try:
            env = wire.parse(frames[0])
        except ServingError as exc:
            log.error("worker %r: %s", identity, exc.message)
            return
        if self.services and not env.request_id:
            # service messages (BLS, metrics, model control) carry no request id; replies to
            # batches (every message of the hot path) do, and skip this lookup
            service = self.services.get(env.WhichOneof("body"))  # type: ignore[arg-type]
            if service is not None:
                handler = functools.partial(service, identity)
        try:
            handler(env, frames[1:])
        except Exception:  # noqa: BLE001 - one bad message must not stop the loop
            log.exception("handling a message from worker %r failed", identity)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.transport.abort()
        self._conns.clear()
        if self._starting is not None:
            self._starting.cancel()
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
