"""``WorkerChannel``: the router's one ZeroMQ ROUTER socket, driven by the event loop.

Workers connect DEALER sockets whose routing id is their identity. Incoming messages are
parsed and handed to the handler registered for that identity. Owned by the router's
event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from shoal.proto import wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb

log = logging.getLogger("shoal.channel")

Handler = Callable[[wpb.Envelope, list[bytes]], None]

_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_ZERO_COPY_BYTES = 1 << 16


class WorkerChannel:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._handlers: dict[bytes, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_pending = False

    def start(self) -> None:
        self._sock.bind(self.endpoint)
        self._loop = asyncio.get_running_loop()
        self._fd: int = self._sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop.add_reader(self._fd, self._drain)

    def register(self, identity: bytes, handler: Handler) -> None:
        self._handlers[identity] = handler

    def unregister(self, identity: bytes) -> None:
        self._handlers.pop(identity, None)

    def send(self, identity: bytes, env: wpb.Envelope, buffers: Sequence[Any] = ()) -> None:
        """Queue a message for a worker; raises ``UNAVAILABLE`` if it is not connected."""
        # Frame by frame with plain int flags: pyzmq's send_multipart costs several times
        # more per message in Python. Only large buffers go zero-copy (zmq copies small
        # ones anyway, and a zero-copy frame is slower to set up).
        send = self._sock.send
        try:
            send(identity, _MORE)
            if buffers:
                send(env.SerializeToString(), _MORE)
                last = len(buffers) - 1
                for i, buf in enumerate(buffers):
                    send(buf, _MORE if i < last else 0, copy=len(buf) < _ZERO_COPY_BYTES)
            else:
                send(env.SerializeToString(), 0)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise ServingError(
                    "the model instance is not connected (it is restarting)", code=ErrorCode.UNAVAILABLE
                ) from None
            raise
        # ZMQ_FD is edge-triggered: a send may consume the readiness edge of pending input.
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_pending and self._loop is not None:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        sock = self._sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator,arg-type]
            try:
                # Copying receive: frames are small (large tensors travel in shared
                # memory), and bytes are cheaper to get than zero-copy Frame objects.
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            identity = frames[0]
            handler = self._handlers.get(identity)
            if handler is None:
                log.debug("message from unknown worker %r dropped", identity)
                continue
            try:
                env = wire.parse(frames[1])
            except ServingError as exc:
                log.error("worker %r: %s", identity, exc.message)
                continue
            try:
                handler(env, frames[2:])
            except Exception:  # noqa: BLE001 - one bad message must not stop the loop
                log.exception("handling a message from worker %r failed", identity)

    def close(self) -> None:
        if self._loop is not None and not self._sock.closed:
            try:
                self._loop.remove_reader(self._fd)
            except (ValueError, zmq.ZMQError):
                pass
        self._sock.close(linger=0)
        self._ctx.term()
