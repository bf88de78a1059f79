"""A frontend process's connection to the router: submits requests as ``BlsCall``s and
turns each ``BlsReply`` into the ``InferResult`` (or error) its handler awaits, or, for a
request of a gRPC stream, into the ``(response, final)`` pairs its stream takes (``stream``).

``RemoteDataPlane`` is what the router's HTTP and gRPC inference handlers need of a
``DataPlane`` (``infer``, ``responses``); everything else they do is the same code as in the
router."""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from shoal.proto import framing, wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.streamflow import ACK_EVERY
from shoal.server.busypoll import BUSY
from shoal.server.frontproc import wire as frontwire
from shoal.server.frontproc.lanes_client import LaneRetry, Lanes, Route
from shoal.server.streaming import StreamItem
from shoal.server.types import Buffer, InferRequest, InferResult, UseProxy
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper

log = logging.getLogger("shoal.frontend")

PROXY_FOR_S = 1.0
"""After the router asked for one request to go through it (tracing is on), the next ones
go there too for this long before a direct submission is tried again."""


STATS_WAIT_S = 0.01
"""How long the statistics of a lane request may wait for others to go with (a reader of
statistics or metrics asks for them first: ``LaneFlush``)."""
STATS_MAX = 256
"""Records sent at once at most."""


class _NotTraced:
    active = False  # the router decides (``BlsReply.proxy``)


Reply = tuple[wpb.BlsReply, list[bytes]]


class _Replies:
    """The replies of one streamed call not taken yet (at most the router's window of
    ``calls.STREAM_WINDOW``: it waits for acknowledgements past that)."""

    __slots__ = ("items", "waiter", "error")

    def __init__(self) -> None:
        self.items: collections.deque[Reply] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.error: ServingError | None = None

    def put(self, reply: Reply) -> None:
        self.items.append(reply)
        self._wake()

    def fail(self, error: ServingError) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Reply:
        while not self.items:
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class RouterLink(asyncio.Protocol):
    def __init__(self, identity: bytes, arena: Arena | None = None, inline_max_bytes: int = 32 << 10) -> None:
        self.identity = identity
        self.arena = arena
        """Where inputs larger than ``inline_max_bytes`` go (the worker reads them there)."""
        self.inline_max_bytes = inline_max_bytes
        self.transport: Any = None
        self.decoder = framing.Decoder()
        self.mapper = Mapper()
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, _Replies] = {}
        """Streamed calls (``stream``) still listening, by call id."""
        self._ids = itertools.count(1)
        self._done_holds: list[int] = []
        self._acks: dict[int, int] = {}
        """Replies of streamed calls taken since the last ``BlsDone``, by call id."""
        self._outbox: list[Any] = []
        self._flushing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = asyncio.Event()
        self.shutdown = asyncio.Event()
        """The router asked this process to stop (``Shutdown``)."""
        self.finish = asyncio.Event()
        """Every inference the router accepted is answered: streams get a short grace."""
        self.proxy_until = 0.0
        self._orphans: dict[int, list[Block]] = {}
        """Input blocks of calls that ended while a worker may still read them, by call id."""
        self.lanes: Lanes | None = None
        """Requests the router lets this process send straight to workers (``lanes_client``)."""
        self._starts: dict[tuple[str, int, str], int] = {}
        """Lane requests sent since the last statistics message, by model, version and lane."""
        self._records: list[dict[str, Any]] = []
        """The other statistics records since then (the fields of a ``LaneStat`` each)."""
        self._stats_timer: asyncio.TimerHandle | None = None

    @classmethod
    async def connect(
        cls, endpoint: str, identity: bytes, arena: Arena | None = None, inline_max_bytes: int = 32 << 10
    ) -> RouterLink:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(
            lambda: cls(identity, arena, inline_max_bytes), framing.socket_path(endpoint)
        )
        link._loop = loop
        link._write([framing.HELLO, identity])
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ServingError("the router closed the connection", code=ErrorCode.UNAVAILABLE))
        self._calls.clear()
        for replies in self._streams.values():
            replies.fail(ServingError("the router closed the connection", code=ErrorCode.UNAVAILABLE))
        self._streams.clear()
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        BUSY.kick()  # answers of requests the router took (not a lane's) come this way
        try:
            messages = self.decoder.feed(data)
        except framing.FramingError as exc:
            log.error("router: %s; closing the connection", exc)
            self.transport.abort()
            return
        for frames in messages:
            env = wire.parse(frames[0])
            body = env.WhichOneof("body")
            if body == "bls_reply":
                reply = env.bls_reply
                replies = self._streams.get(reply.call_id)
                if replies is not None and not reply.inputs_free:
                    replies.put((reply, frames[1:]))
                    continue
                fut = self._calls.pop(reply.call_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((reply, frames[1:]))
                    continue
                if reply.hold_id:  # its caller is gone: the outputs go back at once
                    self._release(reply.hold_id)
                if reply.inputs_free or (reply.final and not reply.inputs_held):
                    self._free(self._orphans.pop(reply.call_id, ()))
            elif body == "lane_flush":  # the statistics so far, then the answer after them
                self._take_stats()
                answer = wire.envelope(0)
                answer.lane_flush.call_id = env.lane_flush.call_id
                self.send(answer)
            elif body == "lane_routes":
                if self.lanes is not None:
                    self.lanes.update(env.lane_routes)
            elif body == "shm_regions":  # sent only while lanes are on, as they are here then
                if self.lanes is not None and self.lanes.shm is not None:
                    self.lanes.shm.update(env.shm_regions)
            elif body == "forget":  # a worker exited: its output arena is gone
                for prefix in env.forget.arena_prefixes:
                    self.mapper.forget_prefix(prefix)
            elif body == "shutdown":
                if self.shutdown.is_set():
                    self.finish.set()
                self.shutdown.set()

    def _soon(self) -> None:
        """Flush at the end of this loop turn (once)."""
        if not self._flushing:
            self._flushing = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _write(self, frames: list[Any]) -> None:
        """Queued, and written at the end of this loop turn with the others of the turn."""
        self._soon()
        self._outbox.extend(framing.encode(frames))

    def report(self, **fields: Any) -> None:
        """A lane request's statistics (the fields of a ``LaneStat``: one record when it is
        sent, ``started``, one when it ends), sent to the router within ``STATS_WAIT_S`` with
        the others of that time (each message wakes the router), or at once when the router
        asks (``LaneFlush``: a client reads statistics or metrics). Only kept here: the
        message is built when it is sent, off the request's way, and the starts of one model
        version on one lane go as one record with their count (``LaneStat.requests``). Building
        two records in place per request had cost the frontend's gRPC lane path about a tenth
        of its Python (``scripts/bench_frontend`` on the 2-core box, best of 15 rounds, two A/B
        pairs: 124 and 135 against 142 and 154 us of CPU a request)."""
        if fields.get("started"):
            key = (fields["model_name"], fields["model_version"], fields["lane"])
            self._starts[key] = self._starts.get(key, 0) + 1
        else:
            self._records.append(fields)
            if len(self._records) >= STATS_MAX:
                self._soon()
                return
        if self._stats_timer is None:
            assert self._loop is not None
            self._stats_timer = self._loop.call_later(STATS_WAIT_S, self._soon)

    def _take_stats(self) -> None:
        """The statistics not sent yet, into the outbox: the starts first (the router counts a
        request in flight before its end)."""
        if self._starts or self._records:
            env = wire.envelope(0)
            add = env.lane_stats.stats.add
            for (name, version, lane), count in self._starts.items():
                add(model_name=name, model_version=version, lane=lane, started=True, requests=count)
            for fields in self._records:
                add(**fields)
            self._starts, self._records = {}, []
            self._outbox.extend(framing.encode([env.SerializeToString()]))
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    def free_blocks(self, blocks: list[Block]) -> None:
        self._free(blocks)

    def place(self, data: Buffer) -> Block | None:
        return self._place(data)

    def _flush(self) -> None:
        self._flushing = False
        self._take_stats()
        if self._done_holds or self._acks:
            env = wire.envelope(0)
            done = env.bls_done
            done.hold_ids.extend(self._done_holds)
            self._done_holds = []
            if self._acks:
                done.ack_calls.extend(self._acks.keys())
                done.ack_counts.extend(self._acks.values())
                self._acks = {}
            self._outbox.extend(framing.encode([env.SerializeToString()]))
        out, self._outbox = self._outbox, []
        if out and not self.transport.is_closing():
            self.transport.writelines(out)

    def send(self, env: wpb.Envelope, frames: list[Any] = ()) -> None:  # type: ignore[assignment]
        self._write([env.SerializeToString(), *frames])

    def _keep(self, call_id: int, blocks: list[Block]) -> None:
        if blocks:
            self._orphans[call_id] = blocks

    def _free(self, blocks: list[Block] | tuple[()]) -> None:
        for b in blocks:
            assert self.arena is not None
            self.arena.free(b)

    def _place(self, data: Buffer) -> Block | None:
        """A copy of a large input in this process's arena (``None``: small, or no room)."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n <= self.inline_max_bytes or self.arena is None:
            return None
        try:
            block = self.arena.allocate(n)
        except ServingError:
            return None  # full: the input travels in the message
        self.arena.view(block)[:] = data
        return block

    def _release(self, hold_id: int) -> None:
        self._soon()
        self._done_holds.append(hold_id)

    def _ack(self, call_id: int, count: int) -> None:
        self._soon()
        self._acks[call_id] = self._acks.get(call_id, 0) + count

    def _begin(self, request: InferRequest, frontend: str, streamed: bool) -> tuple[int, list[Block]]:
        """Submit ``request``; its call id and the blocks its inputs went into."""
        if self.proxy_until and time.monotonic() < self.proxy_until:
            raise UseProxy
        if self.transport is None or self.transport.is_closing():
            raise ServingError("the router is not reachable", code=ErrorCode.UNAVAILABLE)
        call_id = next(self._ids)
        env, frames, blocks = frontwire.pack_call(call_id, request, frontend, self._place if self.arena else None)
        if streamed:
            env.bls_call.decoupled = True
            self._streams[call_id] = _Replies()
        else:
            assert self._loop is not None
            self._calls[call_id] = self._loop.create_future()
        self.send(env, frames)
        return call_id, blocks

    def _ended(self, call_id: int, reply: wpb.BlsReply, blocks: list[Block]) -> None:
        """The call's final reply came: its input blocks are free, or kept until the router
        says ``inputs_free``; a proxy reply sends the request through the router."""
        if reply.inputs_held:
            self._keep(call_id, blocks)
        else:
            self._free(blocks)
        if reply.proxy:
            self.proxy_until = time.monotonic() + PROXY_FOR_S
            raise UseProxy

    def _item(self, reply: wpb.BlsReply, frames: list[Any]) -> InferResult | ServingError:
        hold = reply.hold_id
        release = (lambda: self._release(hold)) if hold else None
        try:
            return frontwire.unpack_result(reply.result, frames, self.mapper.view, release)
        except BaseException:
            if release is not None:
                release()
            raise

    async def stream(self, request: InferRequest, frontend: str) -> AsyncGenerator[StreamItem, None]:
        """The router's responses to one request of a gRPC stream, for a model of either kind
        (``DataPlane.responses``): ``(response, final)`` pairs, a response being an
        ``InferResult`` (the caller ``done``s it), a ``ServingError`` or ``None`` (the final
        flag alone). Raises ``UseProxy`` before the first. Each response taken is acknowledged
        (in groups of ``ACK_EVERY``): the router sends at most its window ahead, so a consumer
        that takes no more (its client does not read) stops the model's responses. Leaving
        before the final one cancels the call at the router."""
        call_id, blocks = self._begin(request, frontend, True)
        replies = self._streams[call_id]
        taken = 0
        ended = False
        try:
            while True:
                reply, rframes = await replies.get()
                final = reply.final
                if final:
                    ended = True
                    del self._streams[call_id]
                    self._ended(call_id, reply, blocks)
                item = self._item(reply, rframes) if reply.HasField("result") else None
                yield item, final
                if final:
                    return
                taken += 1
                if taken == ACK_EVERY:
                    self._ack(call_id, taken)
                    taken = 0
        finally:
            if not ended:
                self._leave(call_id, blocks)

    def _leave(self, call_id: int, blocks: list[Block]) -> None:
        """A streamed call's consumer left before its final reply (its client went away, or
        a failure): the router cancels the call; the replies it sent meanwhile give their
        outputs back as they come."""
        replies = self._streams.pop(call_id, None)
        if replies is None:  # the connection is gone: no worker reads them any more
            self._free(blocks)
            return
        last = None
        for reply, _ in replies.items:
            if reply.hold_id:
                self._release(reply.hold_id)
            if reply.final:
                last = reply
        replies.items.clear()
        if last is None:
            cancel = wire.envelope(0)
            cancel.bls_done.cancel_calls.append(call_id)
            self.send(cancel)
            self._keep(call_id, blocks)  # until the router says inputs_free (or its final reply)
        elif last.inputs_held:
            self._keep(call_id, blocks)
        else:
            self._free(blocks)

    async def infer(self, request: InferRequest, frontend: str) -> InferResult:
        """The router's answer to ``request``; raises its ``ServingError``, or ``UseProxy``."""
        call_id, blocks = self._begin(request, frontend, False)
        fut = self._calls[call_id]
        try:
            reply, rframes = await fut
        except asyncio.CancelledError:  # the client went away: the router cancels the request
            if self._calls.pop(call_id, None) is not None:
                cancel = wire.envelope(0)
                cancel.bls_done.cancel_calls.append(call_id)
                self.send(cancel)
                self._keep(call_id, blocks)  # until the router says inputs_free
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                answered, _ = fut.result()  # answered as the client went: give its outputs back
                if answered.hold_id:
                    self._release(answered.hold_id)
                self._keep(call_id, blocks) if answered.inputs_held else self._free(blocks)
            else:
                self._free(blocks)  # the connection is gone: no worker reads them any more
            raise
        except BaseException:
            self._free(blocks)
            raise
        self._ended(call_id, reply, blocks)
        item = self._item(reply, rframes)
        if isinstance(item, ServingError):
            raise item
        return item


class RemoteDataPlane:
    """The part of ``DataPlane`` that the inference handlers call, answered by the router."""

    tracer = _NotTraced()

    def __init__(self, link: RouterLink, frontend: str) -> None:
        self.link = link
        self.frontend = frontend

    async def infer(self, request: InferRequest, *, decoupled_error: Any = None) -> InferResult:
        BUSY.kick()
        lanes = self.link.lanes
        if lanes is not None:
            route = lanes.route(request)
            if route is not None and not route.decoupled:  # (the router refuses those, with its text)
                try:
                    return await lanes.infer(route, request)
                except LaneRetry:
                    pass  # not executed: the router has the model's current state
        return await self.link.infer(request, self.frontend)

    def responses(self, request: InferRequest, *, decoupled_error: Any = None) -> AsyncGenerator[StreamItem, None]:
        """A streamed request's responses: over a lane where the router publishes the model
        (``Lanes.stream`` for a decoupled one), else the router's (``RouterLink.stream``)."""
        lanes = self.link.lanes
        route = lanes.route(request) if lanes is not None else None
        if lanes is not None and route is not None and not route.decoupled:
            return self._one_response(lanes, route, request)
        return self._stream(request, route)

    def _stream(self, request: InferRequest, route: Route | None) -> AsyncGenerator[StreamItem, None]:
        """A decoupled model's responses over its lane, else (or when it does not take the
        request) the router's, which knows the model's kind."""
        fallback = functools.partial(self.link.stream, request, self.frontend)
        lanes = self.link.lanes
        if lanes is None or route is None or not route.decoupled:
            return fallback()
        return lanes.stream(route, request, fallback)

    async def _one_response(
        self, lanes: Lanes, route: Route, request: InferRequest
    ) -> AsyncGenerator[StreamItem, None]:
        """A streamed request of a model that is not decoupled, over a lane: its one result as
        the final response (errors raise, as the router's)."""
        try:
            result = await lanes.infer(route, request)
        except LaneRetry:  # not executed: the router's
            async with aclosing(self.link.stream(request, self.frontend)) as items:
                async for pair in items:
                    yield pair
            return
        yield result, True

    def raw_input(self, name: str, version: int, nbytes: int) -> tuple[str, str, tuple[int, ...]]:
        raise UseProxy  # the model's metadata is the router's

    # ---- what the generate extension asks (``frontends.http.generate``), for versions published
    # on lanes (their configuration came with the route); another goes through the router

    def _route(self, name: str, version: int) -> Route:
        lanes = self.link.lanes
        route = lanes.routes.get((name, version)) if lanes is not None and lanes.routes else None
        if route is None:
            raise UseProxy
        return route

    def model_metadata(self, name: str, version: int) -> dict[str, Any]:
        """The inputs of the model's metadata (all that generate reads)."""
        mv = self._route(name, version).mv
        return {"inputs": [{"name": t.name, "datatype": t.datatype} for t in mv.inputs.values()]}

    def model_config_message(self, name: str, version: int) -> mc.ModelConfig:
        return self._route(name, version).mv.config

    def is_decoupled(self, name: str, version: int) -> bool:
        return self._route(name, version).decoupled

    def infer_stream(self, request: InferRequest) -> AsyncGenerator[StreamItem, None]:
        """A decoupled model's responses over a lane (the router's where the request needs it)."""
        lanes = self.link.lanes
        return self._stream(request, lanes.route(request) if lanes is not None else None)
