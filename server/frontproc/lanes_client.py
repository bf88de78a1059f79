"""A frontend process's lanes: requests of the model versions the router publishes
(``frontproc.lanes``) go straight to a worker's lane socket, as the router would send them
(an ``Infer`` of one request; for a model whose workers batch lane requests and that names
no preferred batch size, the compatible requests of one loop turn in one ``Infer``:
``_Group``), and come back from it without crossing the router.

The frontend does here what the router does for such a request: it validates the request
against the model's configuration (the router's own ``validate``), picks the instance with
the fewest requests in flight (its own: each frontend balances its share), puts large inputs
in its arena, releases outputs read from the worker's arena, cancels a request whose client
went away, and reports each request for the model's statistics (``LaneStats``, written with
the turn's other messages to the router).

A worker that exits says ``LaneBye`` first: what it had not answered was never executed and
goes through the router (``LaneRetry``), which knows the model's state now. A worker that
dies without it (killed, crashed) fails what it had, as the router fails a dead worker's
batch.

A decoupled model's request on a gRPC stream (``stream``) goes the same way: the worker sends
its responses (``Streamed``) on the lane as the model's sender makes them, the frontend
acknowledges them as its consumer takes them (``StreamAck``, the window the router keeps
otherwise) and sends ``Cancel`` when the client leaves; its inputs stay in use until both the
final response and the worker's answer (``execute`` returned) came. One that dies mid-stream
ends the stream with the error the router would give; a ``LaneBye`` before anything of the
request came sends it through the router.

The lane connection itself and the objects that travel on it are ``frontproc.lanelink``'s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from shoal.proto import wire
from shoal.proto.batchpolicy import batch_key
from shoal.proto.errors import ErrorCode, ServingError, WorkerDied
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.streamflow import ACK_EVERY
from shoal.proto.validation import ConfigSignature, signature
from shoal.server.dispatch.pool import RESERVED_PARAMETERS
from shoal.server.frontproc import wire as frontwire
from shoal.server.frontproc.lanelink import (
    RID_BIT,
    Lane,
    LaneRetry,
    Route,
    _Group,
    _Pending,
    _Stream,
)
from shoal.server.frontproc.shmregions import FrontRegion, ShmRegions
from shoal.server.stats import failure_reason
from shoal.server.streaming import StreamItem
from shoal.server.types import Buffer, InferRequest, InferResult, ShmRef
from shoal.server.validation import validate
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper

log = logging.getLogger("shoal.frontend")

__all__ = ["Lane", "LaneRetry", "Lanes", "Route"]


def _validate(route: Route, request: InferRequest) -> tuple[int, list[tuple[int, ...]]]:
    """Validate ``request`` against ``route``'s version with the router's code (``reshape``
    applied to its inputs' shapes); what it asked for, for ``_as_asked``."""
    asked = request.model_version, [t.shape for t in request.inputs]
    request.model_version = route.mv.version
    validate(route.mv, request)
    return asked


def _as_asked(request: InferRequest, asked: tuple[int, list[tuple[int, ...]]]) -> None:
    """``request`` as the client sent it again: it goes to the router, which validates it."""
    request.model_version, shapes = asked
    for t, shape in zip(request.inputs, shapes, strict=True):
        t.shape = shape


Report = Callable[..., None]
"""Files one statistics record for the router: ``report(**fields of wpb.LaneStat)`` (the
record is built once, in the message that carries it: ``RouterLink.report``)."""


class Lanes:
    def __init__(
        self,
        index: int,
        place: Callable[[Buffer], Block | None],
        free: Callable[[list[Block]], None],
        mapper: Mapper,
        report: Report,
        shm: ShmRegions | None = None,
    ) -> None:
        self.shm = shm
        """The client shared-memory regions the router told this process of."""
        self.place = place
        self.free = free
        self.mapper = mapper
        self.report = report
        self.routes: dict[tuple[str, int], Route] = {}
        self.by_path: dict[str, Lane] = {}
        self._ids = itertools.count(RID_BIT | (index << 48) | 1)
        self._configs: dict[tuple[str, int], ConfigSignature] = {}
        self.inflight = 0
        """Requests sent over lanes and not answered yet."""
        self.idle = asyncio.Event()
        """Set while ``inflight`` is 0 (shutdown waits for it)."""
        self.idle.set()

    # ---- the table -------------------------------------------------------------------------

    def update(self, table: wpb.LaneRoutes) -> None:
        """The router's current routes (replace the last ones)."""
        routes: dict[tuple[str, int], Route] = {}
        configs: dict[tuple[str, int], ConfigSignature] = {}
        paths: dict[str, Lane] = {}
        for r in table.routes:
            key = (r.model_name, int(r.model_version))
            mv = self._configs.get(key)
            if mv is None or mv.config_bytes != r.model_config:
                mv = signature(r.model_name, int(r.model_version), r.model_config)
            configs[key] = mv
            lanes = []
            for spec in r.lanes:
                lane = paths.get(spec.path) or self.by_path.get(spec.path)
                if lane is None or lane.broken:
                    lane = Lane(self, spec.path, spec.label, spec.pid)
                paths[spec.path] = lane
                lanes.append(lane)
            route = Route(mv, lanes)
            routes[key] = route
            if r.latest:
                routes[(r.model_name, -1)] = route
        for path, lane in self.by_path.items():
            if paths.get(path) is not lane and not lane.pending and lane.transport is not None:
                lane.transport.close()  # no longer published (its worker stops, or restarted)
        self.routes, self._configs, self.by_path = routes, configs, paths

    def closed(self, lane: Lane) -> None:
        if self.by_path.get(lane.path) is lane:
            del self.by_path[lane.path]

    # ---- requests --------------------------------------------------------------------------

    def route(self, request: InferRequest) -> Route | None:
        """Where ``request`` may go over a lane (``None``: through the router)."""
        if not self.routes:
            return None
        route = self.routes.get((request.model_name, request.model_version))
        if route is None or request.correlation_id or request.flags or request.trace is not None:
            return None
        params = request.parameters
        if params and ("timeout" in params or "priority" in params):  # the router checks and applies them
            return None
        shm = self.shm
        owner: str | None = None
        for t in request.inputs:
            if t.shm is not None:
                if shm is None or (owner := shm.owner(request.peer)) is None or shm.find(owner, t.shm) is None:
                    return None
        for o in request.outputs or ():
            if o.shm is not None:
                if shm is None or (owner := shm.owner(request.peer)) is None or shm.find(owner, o.shm) is None:
                    return None
                if any(k != "binary_data" and not k.startswith("shared_memory_") for k in o.parameters):
                    return None
            elif o.parameters and any(k != "binary_data" for k in o.parameters):
                return None
        return route

    def _pick(self, route: Route) -> Lane:
        """The instance with the fewest of this process's requests, the next one in turn
        among equals (other frontend processes pick too: starting each search at the same
        instance would send all of them there at low load)."""
        lanes = route.lanes
        n = len(lanes)
        start = route.turn
        route.turn = (start + 1) % n if n else 0
        best: Lane | None = None
        for i in range(n):
            lane = lanes[(start + i) % n]
            if not lane.broken and (best is None or lane.load < best.load):
                best = lane
        if best is None:
            raise LaneRetry
        return best

    async def infer(self, route: Route, request: InferRequest) -> InferResult:
        """``request`` on one of ``route``'s workers; raises its ``ServingError``, or
        ``LaneRetry`` when it was not executed."""
        asked = _validate(route, request)
        try:
            return await self._run(route, request)
        except LaneRetry:
            _as_asked(request, asked)
            raise

    async def _send(
        self, route: Route, request: InferRequest, stream: _Stream | None = None
    ) -> tuple[Lane, int, _Pending]:
        """Send ``request`` to one of ``route``'s workers (``LaneRetry``: it could not be)."""
        mv = route.mv
        lane = self._pick(route)
        if lane.transport is None:
            await lane.ready()
        if lane.broken:
            raise LaneRetry
        size, key = batch_key(request.inputs) if route.group_max and stream is None else (0, ())
        group = lane.open if size else None
        if group is not None and (group.key != key or group.size + size > route.group_max):
            group = None  # a group of its own (the open one is written in its place)
        blocks: list[Block] = []
        regions: list[FrontRegion] = []
        if group is not None:  # joins this turn's group: one more request in its Infer
            rid, env, frames = group.rid, group.env, group.frames
        else:
            rid = next(self._ids)
            env, frames = wire.envelope(rid), []
        requests, nframes = env.infer.requests, len(frames)
        r = requests.add()
        r.id = index = len(group.members) if group is not None else 0
        try:
            self._encode(request, r, frames, blocks, regions)
        except BaseException:
            self.free(blocks)
            del requests[-1]  # (a group's earlier requests stay)
            del frames[nframes:]
            raise
        fut: asyncio.Future[tuple[wpb.Envelope, list[Any]]] = (lane.loop or asyncio.get_running_loop()).create_future()
        p = _Pending(fut, blocks, route, request.batch_size, regions, stream)
        p.lane = lane
        if regions:
            assert self.shm is not None
            self.shm.use(regions)
        if group is not None:
            p.index = index
            p.group = group.members
            group.members.append(p)
            group.size += size
        elif size:
            group = _Group(rid, env, frames, key, size)
            group.members.append(p)
            p.group = group.members
            lane.pending[rid] = p
            lane.add(group)
        else:
            lane.pending[rid] = p
            lane.send(env, frames)
        lane.load += 1
        self.inflight += 1
        if self.inflight == 1:
            self.idle.clear()
        self.report(model_name=mv.name, model_version=mv.version, lane=lane.path, started=True)
        return lane, rid, p

    async def _run(self, route: Route, request: InferRequest) -> InferResult:
        lane, rid, p = await self._send(route, request)
        fut = p.fut
        try:
            reply, rframes = await fut
        except asyncio.CancelledError:  # the client went away: the model may notice
            if rid in lane.pending and not lane.broken:
                cancel = wire.envelope(rid)  # as the router cancels
                cancel.cancel.indexes.append(p.index)
                lane.send(cancel)
            raise
        return self._result(lane, p, request, reply, rframes)

    async def stream(
        self, route: Route, request: InferRequest, fallback: Callable[[], AsyncGenerator[StreamItem, None]]
    ) -> AsyncGenerator[StreamItem, None]:
        """A decoupled model's responses to ``request`` from one of ``route``'s workers, as
        ``DataPlane.infer_stream`` gives them: ``(response, final)`` pairs, a response being
        an ``InferResult`` (the caller ``done``s it), a ``ServingError`` or ``None`` (the
        final flag alone). Each one taken is acknowledged to the worker (in groups of
        ``ACK_EVERY``: its sender waits past its window). Leaving early cancels the request
        (the model sees ``is_cancelled()``) and drops what comes later. A request the worker
        did not take (``LaneRetry``, or ``LaneBye`` before anything of it) is ``fallback()``'s:
        the router's. Validation errors raise before the first response, as the router's."""
        asked = _validate(route, request)
        st = _Stream(request.id)
        request.backlog = st.items.__len__  # responses already here (generate_stream writes them together)
        retry = False
        try:
            lane, rid, p = await self._send(route, request, st)
        except LaneRetry:
            retry = True
        if not retry:
            loop = asyncio.get_running_loop()
            taken = 0
            ended = False
            try:
                while True:
                    items = st.items
                    if not items:
                        if st.retry:
                            retry = True
                            break
                        st.waiter = loop.create_future()
                        await st.waiter
                        continue
                    item, final = items.popleft()
                    yield item, final
                    if final:
                        ended = True
                        return
                    taken += 1
                    if taken == ACK_EVERY:
                        ack = wire.envelope(rid)
                        ack.stream_ack.count = taken
                        lane.send(ack)
                        taken = 0
            finally:
                if not ended and not retry:
                    self._leave_stream(lane, rid, p)
        _as_asked(request, asked)
        async with aclosing(fallback()) as items_:
            async for pair in items_:
                yield pair

    def _leave_stream(self, lane: Lane, rid: int, p: _Pending) -> None:
        """The consumer left before the final response: the model is told (``Cancel``); what
        it sends meanwhile is dropped as it comes (``streamed``)."""
        st = p.stream
        assert st is not None
        st.left = True
        while st.items:
            item, _ = st.items.popleft()
            if isinstance(item, InferResult):
                item.done()
        if not st.final and not lane.broken:
            cancel = wire.envelope(rid)  # as the router cancels
            cancel.cancel.indexes.append(0)
            lane.send(cancel)

    def _encode(
        self, request: InferRequest, r: wpb.Request, frames: list[Any], blocks: list[Block], regions: list[FrontRegion]
    ) -> None:
        """The request as the router's pool encodes it (``InstancePool._encode``); the
        client regions it names in ``regions`` (``LaneRetry``: one is no longer known)."""
        if request.id:
            r.request_id = request.id
        describe = None
        if request.uses_shm:
            describe = self._describer(request, regions)
        frontwire.pack_inputs(request, r, frames, blocks, self.place, parameters=False, client=describe)
        if request.outputs is not None:
            r.outputs.extend(o.name for o in request.outputs)
            if describe is not None:
                for o in request.outputs:
                    if o.shm is not None:
                        describe(o.shm, r.output_shm[o.name])
        params = request.parameters
        if params:
            params = {k: v for k, v in params.items() if k not in RESERVED_PARAMETERS}
            if params:
                r.parameters_json = json.dumps(params)

    def _describer(self, request: InferRequest, regions: list[FrontRegion]) -> Callable[[ShmRef, wpb.ClientShm], None]:
        shm = self.shm
        owner = shm.owner(request.peer) if shm is not None else None
        if shm is None or owner is None:
            raise LaneRetry

        def describe(ref: ShmRef, out: wpb.ClientShm) -> None:
            assert shm is not None and owner is not None
            region = shm.find(owner, ref)
            if region is None:  # dropped since the route was chosen: the router answers
                raise LaneRetry
            region.describe(ref, out)
            regions.append(region)

        return describe

    def _result(
        self, lane: Lane, p: _Pending, request: InferRequest, reply: wpb.Envelope, frames: list[Any]
    ) -> InferResult:
        """The answer of ``request`` (its statistics are reported already)."""
        mv = p.route.mv
        if p.body == "failed":
            raise wire.to_error(reply.failed)
        res = reply.infer_done.results[p.index]
        held = [ref.shm for ref in res.outputs if ref.HasField("shm")]
        release = (lambda: lane.release(held)) if held else None
        item = frontwire.unpack_result(res, frames, self.mapper.view, release)
        if isinstance(item, ServingError):
            raise item
        item.model_name, item.model_version, item.id = mv.name, mv.version, request.id
        return item

    # ---- answers (from the lane's protocol) ---------------------------------------------------

    def _settle(self, p: _Pending) -> None:
        """``p`` is over: its inputs are free, and it is no longer in flight."""
        if p.lane is not None:
            p.lane.load -= 1
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()
        if p.blocks:
            self.free(p.blocks)
        if p.regions:
            assert self.shm is not None
            self.shm.done(p.regions)

    def answered(self, lane: Lane, p: _Pending, env: wpb.Envelope, body: str | None, frames: list[Any]) -> None:
        """The worker answered (``body``: which message): inputs are free; the statistics go
        to the router."""
        self._settle(p)
        request_ns = time.monotonic_ns() - p.t0
        mv = p.route.mv
        ok = executed = False
        failure = ""
        done = env.infer_done if body == "infer_done" else None
        if done is not None and len(done.results) == (len(p.group) if p.group is not None else 1):
            executed = True
            res = done.results[p.index]
            if res.HasField("error"):
                failure = failure_reason(wire.to_error(res.error))
            else:
                ok = True
        elif body == "failed":
            failure = failure_reason(wire.to_error(env.failed))
        else:
            failure = "OTHER"
        left = p.fut.done()
        if left:  # the caller left: nothing reads the outputs
            ok, failure = False, "CANCELED"
            if done is not None:
                held = [ref.shm for ref in done.results[p.index].outputs if ref.shm.region] if executed else []
                if held:
                    lane.release(held)
        if executed and done is not None and not done.counted:  # counted: the worker batched it and counted that
            self.report(
                model_name=mv.name,
                model_version=mv.version,
                lane=lane.path,
                request_ns=request_ns,
                executed=True,
                compute_input_ns=done.compute_input_ns,
                compute_infer_ns=done.compute_infer_ns,
                compute_output_ns=done.compute_output_ns,
                batch_size=p.batch_size,
                ok=ok,
                failure=failure,
            )
        else:
            self.report(
                model_name=mv.name, model_version=mv.version, lane=lane.path, request_ns=request_ns, ok=ok,
                failure=failure, queue_ns=done.queue_ns if done is not None else 0,
            )  # fmt: skip
        if left:
            return
        if body == "failed" or executed:
            p.body = body
            p.fut.set_result((env, frames))
        else:
            p.fut.set_exception(ServingError(f"{lane.label}: malformed reply", code=ErrorCode.INTERNAL))

    def streamed(self, lane: Lane, rid: int, msg: wpb.Streamed, frames: list[Any]) -> None:
        """A response of a decoupled request (the lane's protocol): to its consumer; one
        nobody takes any more gives its output blocks back at once."""
        p = lane.pending.get(rid)
        st = p.stream if p is not None else None
        has_result = msg.HasField("result")
        held = [ref.shm for ref in msg.result.outputs if ref.HasField("shm")] if has_result else []
        if p is None or st is None or st.final or st.left:  # nobody takes it
            if held:
                lane.release(held)
            if p is not None and st is not None and msg.final:
                st.final = True
                if st.answered:
                    self._finish_stream(lane, rid, p)
            return
        st.started = True
        item: InferResult | ServingError | None = None
        if has_result:
            release = (lambda: lane.release(held)) if held else None
            item = frontwire.unpack_result(msg.result, frames, self.mapper.view, release)
            if isinstance(item, InferResult):
                mv = p.route.mv
                item.model_name, item.model_version, item.id = mv.name, mv.version, st.request_id
        final = msg.final
        if final:
            st.final = True
        st.put((item, final))
        if final and st.answered:
            self._finish_stream(lane, rid, p)

    def stream_answered(self, lane: Lane, rid: int, p: _Pending, env: wpb.Envelope, body: str | None) -> None:
        """The worker's answer to a decoupled request (``execute`` returned, or the batch
        failed: its error is the request's final response): reported for the statistics as
        the router counts a decoupled request; the request ends here if its final response
        came already."""
        st = p.stream
        assert st is not None
        st.answered = st.started = True
        mv = p.route.mv
        record: dict[str, Any] = {"model_name": mv.name, "model_version": mv.version, "lane": lane.path,
                                  "request_ns": time.monotonic_ns() - p.t0}  # fmt: skip
        done = env.infer_done if body == "infer_done" else None
        if done is not None and not done.results:
            self.report(
                **record, executed=True, compute_input_ns=done.compute_input_ns, compute_infer_ns=done.compute_infer_ns,
                compute_output_ns=done.compute_output_ns, batch_size=p.batch_size, ok=not st.left,
                failure="CANCELED" if st.left else "",
            )  # fmt: skip
        else:
            if body == "failed":
                err = wire.to_error(env.failed)
            else:
                err = ServingError(f"{lane.label}: malformed reply", code=ErrorCode.INTERNAL)
                if done is not None:
                    held = [ref.shm for r in done.results for ref in r.outputs if ref.HasField("shm")]
                    if held:
                        lane.release(held)
            self.report(**record, failure="CANCELED" if st.left else failure_reason(err))
            st.fail(err)
        if st.final:
            self._finish_stream(lane, rid, p)
        else:
            lane.pending[rid] = p  # its responses still come

    def _finish_stream(self, lane: Lane, rid: int, p: _Pending) -> None:
        """A decoupled request's end: its inputs are free."""
        lane.pending.pop(rid, None)
        self._settle(p)

    def lost(self, lane: Lane, p: _Pending) -> None:
        """The lane closed before the answer: after ``LaneBye`` the request was not executed
        (the router takes it); else the worker died with it."""
        self._settle(p)
        mv = p.route.mv
        request_ns = time.monotonic_ns() - p.t0
        err = WorkerDied(f"{lane.label} (pid {lane.pid}) died while executing the request")
        record = {"model_name": mv.name, "model_version": mv.version, "lane": lane.path, "request_ns": request_ns}
        st = p.stream
        if st is not None:  # a decoupled request
            if lane.bye and not st.started:  # not executed: the router takes it
                self.report(**record, withdrawn=True)
                st.retry = True
                st.wake()
                return
            if not st.answered:
                self.report(**record, failure="CANCELED" if st.left else failure_reason(err))
            st.fail(err)
            return
        if lane.bye:
            self.report(**record, withdrawn=True)
        else:
            self.report(**record, failure="CANCELED" if p.fut.done() else failure_reason(err))
        if not p.fut.done():
            p.fut.set_exception(LaneRetry() if lane.bye else err)
