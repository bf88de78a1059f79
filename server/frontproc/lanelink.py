"""A frontend process's connection to one worker's lane (``Lane``) and what travels on it: a
request in flight (``_Pending``), a decoupled request's responses as they come (``_Stream``),
a loop turn's compatible requests in one ``Infer`` (``_Group``), and a published model version
(``Route``). Which lane a request takes, and what is done with its answer, is ``lanes_client``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from shoal.proto import framing, wire
from shoal.proto.batchpolicy import ShapeKey
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.validation import ConfigSignature
from shoal.server.busypoll import BUSY
from shoal.server.frontproc.shmregions import FrontRegion
from shoal.server.streaming import StreamItem
from shoal.shm.block import Block

if TYPE_CHECKING:
    from shoal.server.frontproc.lanes_client import Lanes

log = logging.getLogger("shoal.frontend")

RID_BIT = 1 << 63
"""Set in the request ids of lane requests: a worker's router never uses such ids."""


class LaneRetry(Exception):
    """The request was not executed on the lane: send it through the router."""


class _Pending:
    __slots__ = ("fut", "blocks", "route", "t0", "batch_size", "body", "regions", "stream", "lane", "index", "group")

    def __init__(self, fut: asyncio.Future[tuple[wpb.Envelope, list[Any]]], blocks: list[Block], route: Route,
                 batch_size: int, regions: list[FrontRegion], stream: _Stream | None = None) -> None:  # fmt: skip
        self.fut = fut
        self.blocks = blocks
        self.route = route
        self.t0 = time.monotonic_ns()
        self.batch_size = batch_size
        self.regions = regions
        """The client regions the request names (``ShmRegions.done`` once answered)."""
        self.body: str | None = None
        """The answer's kind (``infer_done`` or ``failed``), once answered."""
        self.stream = stream
        """A decoupled model's request: its responses (``Lanes.stream``)."""
        self.lane: Lane | None = None
        """Where it was sent."""
        self.index = 0
        """Its place in the ``Infer`` it went in (a group's: ``_Group``)."""
        self.group: list[_Pending] | None = None
        """A group's requests, in order (the first is the one ``Lane.pending`` holds)."""


class _Group:
    """The requests of one loop turn to one worker that batches lane requests itself, with
    the same shapes but the batch dimension: one ``Infer`` of several requests, encoded when
    the lane writes (``Lane._flush``); the worker takes it whole into a batch and answers it
    with one ``InferDone``.

    DESIGN: each message costs the worker's main thread (the wall of a busy instance) a parse,
    a place in its backlog, a batcher's look, an answer envelope and its encoding, whatever the
    number of requests in it."""

    __slots__ = ("rid", "env", "frames", "members", "key", "size")

    def __init__(self, rid: int, env: wpb.Envelope, frames: list[Any], key: ShapeKey, size: int) -> None:
        self.rid = rid
        self.env = env
        self.frames = frames
        self.members: list[_Pending] = []
        self.key = key
        self.size = size


class _Stream:
    """The responses of a decoupled model's request on a lane, as they come, for its consumer
    (``Lanes.stream``). The request ends when both its final response and the worker's
    answer (``InferDone``: ``execute`` returned; or ``Failed``) came: its inputs are in use
    until then, as the router keeps a decoupled batch's."""

    __slots__ = ("request_id", "items", "waiter", "final", "answered", "started", "left", "retry")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.items: deque[StreamItem] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.final = False
        """The final response came (or the request failed: its error is the final one)."""
        self.answered = False
        """The worker's answer came."""
        self.started = False
        """Something came from the worker: the request executed (it cannot go elsewhere)."""
        self.left = False
        """The consumer left before the final response: later responses are dropped."""
        self.retry = False
        """The worker said ``LaneBye`` before anything of it: send it through the router."""

    def put(self, item: StreamItem) -> None:
        self.items.append(item)
        self.wake()

    def fail(self, err: ServingError) -> None:
        """End the stream with ``err`` as its final response, unless it has ended."""
        if not self.final:
            self.final = True
            if not self.left:
                self.put((err, True))

    def wake(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(None)


class Lane(asyncio.Protocol):
    """One connection to one worker's lane socket."""

    def __init__(self, lanes: Lanes, path: str, label: str, pid: int) -> None:
        self.lanes = lanes
        self.path = path
        self.label = label
        self.pid = pid
        self.transport: Any = None
        self.decoder = framing.Decoder()
        self.pending: dict[int, _Pending] = {}
        """By request id: a request, or a group's first (``_Pending.group``)."""
        self.load = 0
        """Requests sent and not answered (a group counts each of its)."""
        self.open: _Group | None = None
        """The group this loop turn's requests join (written at the turn's end)."""
        self.connecting: asyncio.Future[None] | None = None
        self.bye = False
        self.broken = False
        """Gone (bye, closed, or it could not connect): no new requests."""
        self._outbox: list[Any] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop of the connection (set once connected: ``get_running_loop`` costs a
        ``getpid`` system call each time on Python 3.11)."""
        self._spare_fd = -1
        """A duplicate of the socket's descriptor, read once in ``connection_lost``: a write
        that fails (the worker exited) makes the transport drop the connection without reading
        what the worker sent before it left, its ``LaneBye`` and answers included."""

    async def ready(self) -> None:
        if self.transport is not None:
            return
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._connect())
        await asyncio.shield(self.connecting)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: self, self.path)
        except OSError:
            self.broken = True
            raise LaneRetry from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._spare_fd = os.dup(sock.fileno())
            os.set_blocking(self._spare_fd, False)

    def data_received(self, data: bytes) -> None:
        BUSY.kick()
        try:
            messages = self.decoder.feed(data)
        except framing.FramingError as exc:
            log.error("lane %s: %s; closing it", self.path, exc)
            self.transport.abort()
            return
        for frames in messages:
            env = wire.parse(frames[0])
            body = env.WhichOneof("body")
            if body == "lane_bye":
                self.bye = self.broken = True
                continue
            if body == "streamed":
                self.lanes.streamed(self, env.request_id, env.streamed, frames[1:])
                continue
            p = self.pending.pop(env.request_id, None)
            if p is not None:
                if p.stream is not None:
                    self.lanes.stream_answered(self, env.request_id, p, env, body)
                elif p.group is None:
                    self.lanes.answered(self, p, env, body, frames[1:])
                else:
                    rest = frames[1:]
                    for member in p.group:
                        self.lanes.answered(self, member, env, body, rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_what_is_left()
        self.broken = True
        pending, self.pending = self.pending, {}
        for p in pending.values():
            for member in p.group or (p,):
                self.lanes.lost(self, member)
        self.lanes.closed(self)

    def _read_what_is_left(self) -> None:
        """Deliver what the worker sent that the transport did not read (it stops at a failed
        write), so that a ``LaneBye`` before the worker's exit is seen as one."""
        fd, self._spare_fd = self._spare_fd, -1
        if fd < 0:
            return
        try:
            while chunk := os.read(fd, 1 << 16):
                self.data_received(chunk)
        except OSError:
            pass  # nothing more (EAGAIN), or the socket is gone
        finally:
            os.close(fd)

    def send(self, env: wpb.Envelope, frames: list[Any] = ()) -> None:  # type: ignore[assignment]
        if not self._outbox:
            (self.loop or asyncio.get_running_loop()).call_soon(self._flush)
        self._outbox.extend(framing.encode([env.SerializeToString(), *frames]))

    def add(self, group: _Group) -> None:
        """A group, written (encoded then) with the turn's other messages, in its place."""
        if not self._outbox:
            (self.loop or asyncio.get_running_loop()).call_soon(self._flush)
        self._outbox.append(group)
        self.open = group

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if self.open is not None:
            self.open = None
            out = [b for x in out for b in (_encoded(x) if x.__class__ is _Group else (x,))]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def release(self, blocks: list[wpb.ShmSlice]) -> None:
        if self.broken or self.transport is None:
            return  # the worker is gone: its arena too
        env = wire.envelope(0)
        env.release.blocks.extend(blocks)
        self.send(env)


def _encoded(group: _Group) -> list[Any]:
    return framing.encode([group.env.SerializeToString(), *group.frames])


class Route:
    """One model version a request may send over lanes."""

    __slots__ = ("mv", "lanes", "turn", "decoupled", "group_max")

    def __init__(self, mv: ConfigSignature, lanes: list[Lane]) -> None:
        self.mv = mv
        self.lanes = lanes
        self.turn = 0
        self.decoupled = mv.config.model_transaction_policy.decoupled
        """Its requests go over lanes as streams only (``Lanes.stream``)."""
        cfg = mv.config
        # published with a dynamic batcher: its workers batch lane requests; with preferred
        # sizes a message could not be split to make one (requests of 3 + 4 rows, then 1,
        # where one by one they form 4 + 4, as Triton's batcher would)
        batches = cfg.HasField("dynamic_batching") and not cfg.dynamic_batching.preferred_batch_size
        self.group_max = cfg.max_batch_size if batches and not self.decoupled else 0
        """A loop turn's compatible requests go to a worker together up to this batch size (0:
        one by one: a model whose workers do not batch them executes each message as one
        batch; one with preferred batch sizes gets them one by one too)."""
