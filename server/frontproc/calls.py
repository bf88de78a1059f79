"""The router's side of a frontend process's calls (``server.frontproc``): a client's
request decoded by the frontend runs through the data plane like any request, its answer goes
back as ``BlsReply`` (``BlsRouter`` owns the replies, the outputs held by reference and the
cancellation of calls; this module what only frontend calls have: the inputs in the frontend's
arena, the proxy answer while tracing is on, and the flow control of streamed calls)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from shoal.proto import streamflow, wire
from shoal.proto.errors import ServingError, from_exception
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.callerinputs import CallerInputs
from shoal.server.dataplane import GRPC_DECOUPLED_ERROR, HTTP_DECOUPLED_ERROR, DataPlane
from shoal.server.frontproc import wire as frontwire
from shoal.server.streaming import StreamItem
from shoal.server.types import InferResult
from shoal.shm.mapper import Mapper

log = logging.getLogger("shoal.frontends")

Reply = Callable[..., None]
"""``BlsRouter._reply(identity, call_id, item, final, *, inputs_held=False)``."""
Send = Callable[[bytes, wpb.Envelope, list[Any]], None]


STREAM_WINDOW = streamflow.WINDOW
"""Replies of a frontend process's streamed call (``BlsCall.decoupled``) that it has not
acknowledged (``BlsDone.ack_calls``) at most: past that the router takes no more of the
model's responses, so the model's response sender waits (``DataPlane.infer_stream``'s flow
control) instead of a slow client's responses filling the router or the frontend. The
frontend acknowledges in groups of ``streamflow.ACK_EVERY`` (a divisor of this); the
replies' bytes in a worker's arena count too, as between a worker and its consumer
(``proto.streamflow``)."""


def arena_bytes(item: InferResult | ServingError | None) -> int:
    """Bytes of a worker's output arena a reply passes by reference."""
    if not isinstance(item, InferResult):
        return 0
    return sum(o.arena.nbytes for o in item.outputs if o.arena is not None)


class ReplyWindow:
    """The unacknowledged replies of one streamed call (a frontend's, or a model's
    ``exec(decoupled=True)``): at most ``STREAM_WINDOW``, and once ``ACK_EVERY`` or more are
    out, at most ``streamflow.BYTES`` of a worker's arena (the caller acknowledges every
    ``ACK_EVERY`` it takes, so waiting only then always ends)."""

    __slots__ = ("unacked", "_waiter", "_sizes", "_bytes")

    def __init__(self) -> None:
        self.unacked = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sizes: collections.deque[int] = collections.deque()
        self._bytes = 0

    def _full(self) -> bool:
        return self.unacked >= STREAM_WINDOW or (
            self.unacked >= streamflow.ACK_EVERY and self._bytes >= streamflow.BYTES
        )

    async def sent(self, nbytes: int = 0) -> None:
        """One more reply is out (``nbytes`` of a worker's arena by reference): returns once
        the caller has room for the next."""
        self.unacked += 1
        self._sizes.append(nbytes)
        self._bytes += nbytes
        while self._full():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def ack(self, count: int) -> None:
        self.unacked -= count
        sizes = self._sizes
        for _ in range(min(count, len(sizes))):
            self._bytes -= sizes.popleft()
        waiter = self._waiter
        if waiter is not None and not self._full() and not waiter.done():
            waiter.set_result(None)


class FrontendCalls:
    def __init__(self, dataplane: DataPlane, mapper: Mapper, reply: Reply, send: Send) -> None:
        self.dp = dataplane
        self.mapper = mapper
        self._reply = reply
        self._send = send
        self.windows: dict[tuple[bytes, int], ReplyWindow] = {}
        """Streamed calls in flight (flow control), by caller (a frontend process or a model's
        worker) and call id."""

    def ack(self, identity: bytes, done: wpb.BlsDone) -> None:
        """The frontend wrote these replies of its streamed calls to their clients."""
        for call_id, count in zip(done.ack_calls, done.ack_counts, strict=False):
            window = self.windows.get((identity, call_id))
            if window is not None:
                window.ack(count)

    async def relay(
        self, identity: bytes, call_id: int, responses: AsyncGenerator[StreamItem, None]
    ) -> InferResult | ServingError | None:
        """A streamed call's responses as replies that are not final, at most
        ``STREAM_WINDOW`` ahead of the caller's acknowledgements; returns the final response,
        which the caller of this sends once it knows whether the inputs are still read."""
        item = None
        key = (identity, call_id)
        window = self.windows[key] = ReplyWindow()
        try:
            async with aclosing(responses) as items:
                async for response, final in items:
                    if final:
                        item = response
                        continue
                    nbytes = arena_bytes(response)
                    self._reply(identity, call_id, response, False)
                    await window.sent(nbytes)
        finally:
            self.windows.pop(key, None)
        return item

    async def serve(self, identity: bytes, call: wpb.BlsCall, frames: list[bytes], held: CallerInputs) -> None:
        """A client's request decoded by a frontend process (``server.frontproc``). Inputs in
        the frontend's arena are its to reuse once no worker reads them: with the final reply,
        or, when the call ended first, by a later ``inputs_free`` reply.

        A streamed request (``call.decoupled``: gRPC ``ModelStreamInfer``) may name a model
        of either kind (``DataPlane.responses``); at most ``STREAM_WINDOW`` of its replies
        are unacknowledged by the frontend before the next response is taken."""
        call_id = call.call_id
        if self.dp.tracer.active:  # traces start and end in the router's own frontends
            env = wire.envelope(0)
            env.bls_reply.call_id, env.bls_reply.final, env.bls_reply.proxy = call_id, True, True
            self._send(identity, env, [])
            held.answered()
            return
        item: InferResult | ServingError | None
        try:
            request = frontwire.unpack_call(call, frames, self.mapper.view, held.lease)
            if call.decoupled:
                item = await self.relay(
                    identity, call_id, self.dp.responses(request, decoupled_error=GRPC_DECOUPLED_ERROR)
                )
            else:
                decoupled_error = GRPC_DECOUPLED_ERROR if call.frontend == "grpc" else HTTP_DECOUPLED_ERROR
                item = await self.dp.infer(request, decoupled_error=decoupled_error)
        except asyncio.CancelledError:
            held.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is the client's answer
            if not isinstance(exc, ServingError):
                log.exception("a request to model '%s' failed", call.model_name)
            item = exc if isinstance(exc, ServingError) else from_exception(exc)
        # a worker still reads inputs in the frontend's arena (the call ended first): the
        # frontend keeps them until inputs_free
        self._reply(identity, call_id, item, True, inputs_held=held.answered())
