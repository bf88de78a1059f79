"""The router's side of lanes: which model versions frontend processes may send straight to a
worker (``LaneRoutes``), and the statistics of the requests they served that way
(``LaneStats``).

DESIGN (issue 15): with 4 frontend processes the router itself is the wall for small requests
(``scripts/cpu_split`` on the 16-core device machine, HTTP c=64: the router at 100% of a core,
78 us of its CPU per request, 112-136 us over gRPC; each frontend at 75%, the worker at 80%).
Every request crossed it twice (frontend -> router -> worker and back). A model that needs
nothing of the router per request (no batching, sequence or ensemble scheduling, response
cache, rate limiter, deadline, trace; ``eligible``) does not need that
crossing: the router publishes such versions with their READY instances' lane sockets, and a
frontend sends each request to an instance's worker itself (``frontproc.lanes_client``), then
reports what the router would have counted. Everything else still goes through the router,
as does any request of a lane-eligible model that uses what only the router has (classification,
a ``timeout`` or ``priority``, sequence ids, a client region a frontend was not told of:
``frontproc.shmmirror``).

Decoupled models (without a dynamic batcher) are published too: their streams' responses
come from the worker on the lane (``lanes_client.Lanes.stream``). Through the router each
streamed response crossed it on its way to the frontend: on the 2-core dev box (2 frontends,
8 streams of 100 responses per request, A/B/A/B) the router spent 21-23 us and the frontend
52-60 us of CPU per response (the worker 20-22), 9.0k and 10.5k responses/s; over lanes the
frontend spends 47-50 us and the router nothing, 13.2k and 13.9k responses/s (1.39x).

The table is recomputed every ``POLL_S`` and pushed to every frontend when it changed, and at
once when the server stops accepting (``refresh``). A request sent on a stale route is safe:
a worker that exits says ``LaneBye`` first, and the frontend sends what it had not answered
through the router, which has the current state (the model's unload error, another instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from shoal.proto import wire
from shoal.proto.batchpolicy import worker_batchable
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.scheduling.direct import DirectScheduler
from shoal.server.scheduling.dynamic import DynamicBatcher
from shoal.server.stats import FAILURE_REASONS

if TYPE_CHECKING:
    from shoal.server.dataplane import DataPlane
    from shoal.server.dispatch.worker import Worker
    from shoal.server.models import ModelVersion

log = logging.getLogger("shoal.frontends")

FLUSH_TIMEOUT_S = 0.5
"""How long a statistics read waits for the frontends' lane statistics at most."""
POLL_S = 0.05
"""How often the router recomputes the routes (model loads, unloads and worker restarts
reach the frontends within this)."""


def eligible(dp: DataPlane, mv: ModelVersion) -> bool:
    """Whether requests of ``mv`` may skip the router (its READY instances with a lane)."""
    if not mv.ready or mv.pool is None:
        return False
    scheduler = type(mv.scheduler)
    if mv.decoupled and scheduler is not DirectScheduler:  # a worker batches lane requests of no decoupled model
        return False
    if scheduler is not DirectScheduler and not (scheduler is DynamicBatcher and worker_batchable(mv.config)):
        return False
    if dp.cache is not None and mv.cached:
        return False
    # a rate limiter and the stall watchdog need every execution to pass the router
    return all(w.rate is None and not w.spec.stall_timeout_s for w in mv.pool.workers)


class LaneTable:
    def __init__(self, dp: DataPlane, channel: WorkerChannel, frontends: list[bytes]) -> None:
        self.dp = dp
        self.channel = channel
        self.frontends = frontends
        """The frontend processes' identities on the channel."""
        self.table = b""
        self._workers: dict[str, Worker] = {}
        """The published instances by lane socket."""
        self._inflight: dict[bytes, dict[str, int]] = {}
        """Lane requests each frontend has in flight, by lane socket (a frontend that exits
        takes its share of each instance's ``lane_requests`` with it)."""
        self._told: dict[bytes, bytes] = {}
        """Workers of Python models (their BLS calls go over lanes too, ``workers.lanecalls``)
        and the table each was sent last."""
        self._reporters: set[bytes] = set()
        """Workers that reported lane calls (``settle``)."""
        self._task: asyncio.Task[None] | None = None
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._flush_ids = itertools.count(1)
        channel.services["lane_stats"] = self.on_stats
        channel.services["lane_flush"] = self.on_flushed
        channel.on_disconnect.append(self.forget)
        dp.changed.append(self.refresh)  # tracing turned on: at once, before the change is answered

    def routes(self) -> wpb.Envelope:
        env = wire.envelope(0)
        table = env.lane_routes
        dp = self.dp
        workers = self._workers
        if not dp.accepting or dp.tracer.active or dp.request_timeout_s:
            table.SetInParent()
            return env
        for name, versions in sorted(dp.registry.models.items()):
            ready = [mv for mv in versions.values() if mv.ready]
            latest = max((mv.version for mv in ready), default=-1)
            for mv in sorted(ready, key=lambda m: m.version):
                if not eligible(dp, mv):
                    continue
                assert mv.pool is not None
                lanes = [w for w in mv.pool.workers if w.ready and w.lane]
                if not lanes:
                    continue
                route = table.routes.add()
                route.model_name, route.model_version, route.latest = name, mv.version, mv.version == latest
                if not mv.config_bytes:
                    mv.config_bytes = mv.config.SerializeToString()
                route.model_config = mv.config_bytes
                for w in lanes:
                    workers[w.lane] = w
                    lane = route.lanes.add()
                    lane.path, lane.label, lane.pid = w.lane, w.label, w.pid
        table.SetInParent()
        return env

    def refresh(self) -> None:
        """Recompute the routes; push them to every frontend if they changed."""
        # instances published once stay known while their process serves (their requests in
        # flight are counted until answered, even when the routes no longer list them)
        self._workers = {p: w for p, w in self._workers.items() if w.ready and w.lane == p}
        env = self.routes()
        raw = env.SerializeToString()
        if raw == self.table:
            self._tell_callers(env, raw)
            return
        self.table = raw
        for inflight in self._inflight.values():  # instances no longer published
            for path in [p for p in inflight if p not in self._workers]:
                del inflight[path]
        for identity in self.frontends:
            self.send(identity, env)
        self._tell_callers(env, raw)

    def _tell_callers(self, env: wpb.Envelope, raw: bytes) -> None:
        """The table to every READY worker of a Python model that has not had it yet."""
        told: dict[bytes, bytes] = {}
        last = self._told
        for versions in self.dp.registry.models.values():
            for mv in versions.values():
                if mv.pool is None or mv.config.backend != "python":
                    continue
                for w in mv.pool.workers:
                    if not (w.ready and w.lane):
                        continue
                    if last.get(w.identity) != raw:
                        try:
                            self.channel.send(w.identity, env)
                        except ServingError:
                            continue
                    told[w.identity] = raw
        self._told = told

    def send(self, identity: bytes, env: wpb.Envelope | None = None) -> None:
        """The current routes to one frontend (one that just started)."""
        if env is None:
            env = wpb.Envelope.FromString(self.table) if self.table else self.routes()
        try:
            self.channel.send(identity, env)
        except ServingError:  # not connected: it gets them when it is ready
            pass

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="lane routes")

    async def _poll(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("computing the lane routes failed")
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def settle(self) -> None:
        """Once every frontend has sent the statistics of the lane requests it answered so
        far (they batch them for ``link.STATS_WAIT_S``): a client that reads statistics or
        metrics after its answers sees them counted. A frontend that does not answer within
        ``FLUSH_TIMEOUT_S`` is not waited for.

        Workers send their lane calls' statistics at once, before the call's model answers:
        by the time a client reads statistics after its answer they are readable on the
        router's socket already, so one turn of the loop reads them (asking a worker instead
        would wait for a model that computes without reading its socket)."""
        if self._reporters:
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        waits = []
        for identity in self.frontends:
            call_id = next(self._flush_ids)
            env = wire.envelope(0)
            env.lane_flush.call_id = call_id
            try:
                self.channel.send(identity, env)
            except ServingError:  # not connected: it has nothing to send
                continue
            fut = self._flushes[call_id] = loop.create_future()
            waits.append((call_id, fut))
        if not waits:
            return
        try:
            await asyncio.wait([f for _, f in waits], timeout=FLUSH_TIMEOUT_S)
        finally:
            for call_id, _ in waits:
                self._flushes.pop(call_id, None)

    def on_flushed(self, identity: bytes, env: wpb.Envelope, frames: list[bytes]) -> None:
        fut = self._flushes.pop(env.lane_flush.call_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def forget(self, identity: bytes) -> None:
        """A frontend process is gone: its lane requests are no longer in flight."""
        self._reporters.discard(identity)
        inflight = self._inflight.pop(identity, None)
        for path, count in (inflight or {}).items():
            w = self._workers.get(path)
            if w is not None:
                w.lane_requests = max(0, w.lane_requests - count)

    def on_stats(self, identity: bytes, env: wpb.Envelope, frames: list[bytes]) -> None:
        """Requests a frontend served over lanes, counted as the router counts its own."""
        models = self.dp.registry.models
        workers = self._workers
        inflight = self._inflight.get(identity)
        if inflight is None:
            inflight = self._inflight[identity] = {}
            if identity not in self.frontends:
                self._reporters.add(identity)
        for s in env.lane_stats.stats:
            w = workers.get(s.lane)
            if s.started:
                if w is not None:
                    n = s.requests or 1
                    w.lane_requests += n
                    inflight[s.lane] = inflight.get(s.lane, 0) + n
                continue
            if w is not None and inflight.get(s.lane, 0) > 0:
                inflight[s.lane] -= 1
                w.lane_requests -= 1
            if s.withdrawn:
                continue
            if s.execution:  # a worker batched lane requests: their clients count the requests
                mv = models.get(s.model_name, {}).get(int(s.model_version))
                if mv is not None:
                    mv.stats.execution(s.batch_size, s.requests, s.compute_input_ns, s.compute_infer_ns,
                                       s.compute_output_ns)  # fmt: skip
                continue
            mv = models.get(s.model_name, {}).get(int(s.model_version))
            if mv is None:  # unloaded meanwhile: its statistics are gone too
                continue
            stats = mv.stats
            if s.executed:
                n = s.batch_size or 1
                stats.execution(n, 1, s.compute_input_ns, s.compute_infer_ns, s.compute_output_ns)
            stats.request_done(s.ok, s.request_ns, s.queue_ns)
            if not s.ok:
                reason = s.failure if s.failure in FAILURE_REASONS else "OTHER"
                stats.failures[reason] += 1
