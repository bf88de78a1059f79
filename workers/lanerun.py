"""``LaneRuns``: how a worker executes the requests frontend processes send on its lane socket
(``workers.lanes``) when its model batches them (``workers.lanebatch``), and how it answers
any lane request: one execution per batch, counted here, each request answered on its own
lane; for a ``pipelined`` backend the next batch is read and launched while the device runs
the one before. Part of ``WorkerRuntime`` (``workers.runtime``), which owns the state used here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from shoal.proto import wire
from shoal.proto.errors import ServingError, from_exception
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.block import Block
from shoal.workers.backends.base import Launched, WorkRequest
from shoal.workers.inbox import Incoming
from shoal.workers.lanes import CLOSED, Lane
from shoal.workers.outbox import encode, encode_joined

if TYPE_CHECKING:
    from collections.abc import Iterable

    from shoal.workers.backends.base import Backend, ModelSpec, WorkResponse
    from shoal.workers.clientshm import ClientRegions
    from shoal.workers.inbox import Inbox
    from shoal.workers.lanebatch import LaneBatcher
    from shoal.workers.lanes import LaneServer
    from shoal.workers.tensors import OutputWriter

log = logging.getLogger("shoal.worker")


def _lane_work(item: Incoming) -> bool:
    """A lane's request or cancel (what ``_pipeline_lanes`` takes between batches)."""
    env, _, lane = item
    return lane is not None and env is not CLOSED and env.WhichOneof("body") in ("infer", "cancel")


@dataclasses.dataclass(slots=True, eq=False)
class _LaneBatch:
    """A lane batch between ``_launch_lanes`` and ``_finish_lanes``."""

    items: list[Incoming]
    replies: list[tuple[wpb.Envelope, list[Any]]]
    work: list[WorkRequest] = dataclasses.field(default_factory=list)
    dests: list[Any] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    arrived: list[int] = dataclasses.field(default_factory=list)
    t0: int = 0
    t1: int = 0
    t_launched: int = 0
    overlap_ns: int = 0
    """Time inside this batch's compute infer span that belongs to its neighbours: reading and
    launching the next batch (its compute input and infer), and finishing and answering the
    one before after this one was launched (its wait and compute output). Subtracted, so that
    no stretch of time counts for two executions."""
    launched: Launched | None = None
    error: Exception | None = None


class LaneRuns:
    """Lane batches and lane answers, for ``WorkerRuntime`` (whose attributes and methods
    below are declared for type checking only)."""

    if TYPE_CHECKING:
        backend: Backend | None
        writer: OutputWriter | None
        spec: ModelSpec | None
        inbox: Inbox | None
        lanes: LaneServer | None
        lane_batcher: LaneBatcher | None
        lock: threading.RLock
        regions: ClientRegions
        stop_requested: bool

        def _read_batch(
            self, env: wpb.Envelope, frames: list[bytes], backend: Backend, lane: Lane | None = None
        ) -> tuple[list[WorkRequest], list[Any]]: ...
        def _fill(
            self, req: WorkRequest, resp: WorkResponse, result: wpb.Result, out_frames: list[Any], dest: Any
        ) -> None: ...
        def _free_result(self, result: wpb.Result) -> None: ...
        def _free_blocks(self, blocks: Iterable[Block]) -> None: ...
        def _log_failure(self, err: ServingError) -> None: ...
        def _send_encoded(self, data: bytes) -> None: ...

    def _infer_lanes(self, items: list[Incoming]) -> None:
        """Lane requests this worker batched (``workers.lanebatch``): one execution, counted
        here (the clients count the requests), each request answered on its lane."""
        self._finish_lanes(self._launch_lanes(items))

    def _pipeline_lanes(self, items: list[Incoming]) -> None:
        """``_infer_lanes`` for a ``pipelined`` backend: while a batch runs on the device the
        worker reads and launches the next one, if lane requests are waiting, and only then
        waits for the first and answers it. So the GPU computes while the worker handles
        requests (one instance on its own reached 0.57x the in-process loop over system
        shared memory at c=64 with the two in turn). When a lane request is waiting, the
        next batch gathers requests until it is full or the running batch's device work is
        done (the queue delay plays no part: its requests wait for the instance anyway, as
        in Triton's batcher while every instance is busy); when none is waiting, the running
        batch is answered at once. Releases and cancels on lanes are handled in between;
        anything else ends the pipeline, and the main loop takes it in its turn. A batch that
        its backend left waiting (``Launched.start``: onnxruntime's thread) is begun only
        when a request waits behind it; else it runs in ``finish``, on this thread."""
        launched = self._launch_lanes(items)
        while True:
            following = None
            if not self.stop_requested:
                nxt = self._waiting_lane_batch(launched)
                following = self._launch_lanes(nxt) if nxt else None
                if following is not None and following.t_launched:
                    launched.overlap_ns += following.t_launched - following.t0
            self._finish_lanes(launched)
            if following is None:
                return
            if following.t_launched:  # its launch was followed by the answer of the one before
                following.overlap_ns += time.monotonic_ns() - following.t_launched
            launched = following

    def _waiting_lane_batch(self, running: _LaneBatch) -> list[Incoming] | None:
        """The next lane batch if lane requests come first in the backlog (cancels before
        them are passed over), else None; gathered while ``running`` runs."""
        inbox, batcher, launched = self.inbox, self.lane_batcher, running.launched
        assert inbox is not None and batcher is not None
        if launched is not None and inbox.backlog:
            launched.start()  # something to read meanwhile
        inbox.read_now(0)
        while True:
            item = inbox.take_first(_lane_work)
            if item is None:
                return None
            env, _, lane = item
            kind = env.WhichOneof("body")
            if kind == "infer" and lane is not None and not lane.dead:
                if launched is None:
                    return batcher.gather(item)
                launched.start()
                return batcher.gather(item, until=launched.done)

    def _launch_lanes(self, items: list[Incoming]) -> _LaneBatch:
        """Read a lane batch and start it on the backend (``_finish_lanes`` answers it)."""
        batch = _LaneBatch(items, [(wire.envelope(env.request_id), []) for env, _, _ in items])
        backend = self.backend
        try:
            if backend is None or self.writer is None or self.spec is None:
                raise ServingError("model is not loaded")
            batch.t0 = time.monotonic_ns()
            backend.begin_batch()
            try:
                for env, frames, _ in items:
                    w, d = self._read_batch(env, frames, backend)
                    batch.work.extend(w)
                    batch.dests.extend(d)
                    batch.counts.append(len(w))
            finally:
                self.regions.finish_reads()
            batch.t1 = time.monotonic_ns()
            batch.arrived = self.lane_batcher.arrived if self.lane_batcher is not None else []
            batch.launched = backend.launch(batch.work)
            batch.t_launched = time.monotonic_ns()
        except Exception as exc:  # noqa: BLE001 - a failed batch is reported, never fatal
            batch.error = exc
        return batch

    def _finish_lanes(self, batch: _LaneBatch) -> None:
        """Wait for a launched lane batch and answer each of its requests on its lane."""
        replies, work, dests, spec = batch.replies, batch.work, batch.dests, self.spec
        stat: wpb.LaneStat | None = None
        held = True  # answers may name arena blocks (unknown until written)
        try:
            if batch.error is not None:
                raise batch.error
            assert batch.launched is not None and spec is not None
            t0, t1 = batch.t0, batch.t1
            responses = batch.launched.finish()
            t2 = time.monotonic_ns()
            # the next batch's reading and launch happened inside [t1, t2]: counted there, not here
            infer_ns = max(0, t2 - t1 - batch.overlap_ns)
            if len(responses) != len(work):
                raise ServingError(f"backend returned {len(responses)} responses where {len(work)} were expected")
            with self.lock:
                blocks_before = self.writer.blocks_out if self.writer is not None else 0
                i = 0
                for (reply, out_frames), n in zip(replies, batch.counts, strict=True):
                    done = reply.infer_done
                    done.counted = True
                    for req, resp, dest in zip(work[i : i + n], responses[i : i + n], dests[i : i + n], strict=True):
                        result = done.results.add()
                        result.id = req.id
                        self._fill(req, resp, result, out_frames, dest)
                    i += n
                self.regions.finish_writes()
                held = self.writer is None or self.writer.blocks_out != blocks_before
            t3 = time.monotonic_ns()
            arrived = batch.arrived
            for k, (reply, _) in enumerate(replies):
                done = reply.infer_done
                done.compute_input_ns, done.compute_infer_ns, done.compute_output_ns = t1 - t0, infer_ns, t3 - t2
                if k < len(arrived) and arrived[k]:
                    done.queue_ns = max(0, t0 - arrived[k])
            rows = sum(next(iter(w.inputs.values())).shape[0] for w in work if w.inputs)
            stat = wpb.LaneStat(model_name=spec.name, model_version=spec.version, execution=True, executed=True,
                                batch_size=rows, requests=len(work), compute_input_ns=t1 - t0,
                                compute_infer_ns=infer_ns, compute_output_ns=t3 - t2)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed batch is reported, never fatal
            err = from_exception(exc)
            self._log_failure(err)
            with self.lock:
                for reply, _ in replies:
                    for res in reply.infer_done.results:
                        self._free_result(res)
            for reply, out_frames in replies:
                reply.ClearField("infer_done")
                out_frames.clear()
                wire.failed(err, reply.failed)
        bls = spec.bls if spec is not None else None
        counts_first = bls.take_stats() if bls is not None else b""  # the model's lane calls too
        if stat is not None:
            env = wire.envelope(0)
            env.lane_stats.stats.append(stat)
            counts_first += encode_joined([env.SerializeToString()])
        if counts_first:
            self._send_encoded(counts_first)
        joined: dict[Lane, list[bytes]] = {}  # each lane's small answers, written together
        for (reply, out_frames), (env, _, lane) in zip(replies, batch.items, strict=True):
            assert lane is not None
            self._answer_lane(lane, reply, out_frames, joined, held)
            if self.inbox is not None and self.inbox.cancelled:
                self.inbox.forget_cancelled(env.request_id)
        for lane, messages in joined.items():
            self._write_lane(lane, [], b"".join(messages))

    def _answer_lane(
        self,
        lane: Lane,
        reply: wpb.Envelope,
        out_frames: list[Any],
        joined: dict[Lane, list[bytes]] | None = None,
        held_blocks: bool = True,
    ) -> None:
        """Send a lane request's answer on its lane; its output blocks are the lane's until
        its client releases them (or the lane ends). With ``joined``, a small answer is
        encoded into ``joined[lane]`` for the caller to write with the lane's other answers
        of the batch (one system call per lane and batch instead of one per request: a
        batch of 84 over 8 frontends' lanes made 84 writes). ``held_blocks`` False: the
        answer names no arena block (none was written), so it is not searched for them."""
        if held_blocks and reply.HasField("infer_done"):
            held = lane.held
            for res in reply.infer_done.results:
                for ref in res.outputs:
                    if ref.HasField("shm"):
                        s = ref.shm
                        held.add(Block(s.region, s.offset, s.nbytes, s.device))
        if lane.dead:  # its client left while it executed
            if lane.closed:
                self._drop_lane(lane)  # frees what was just added
            return  # else the inbox filed CLOSED: dropped next
        frames = [reply.SerializeToString(), *out_frames]
        if joined is not None:
            bufs = encode(frames)
            if len(bufs) == 1:
                joined.setdefault(lane, []).append(bufs[0])
                return
            earlier = joined.pop(lane, None)  # a large answer: after the lane's answers before it
            self._write_lane(lane, frames, b"".join(earlier) if earlier else b"")
            return
        self._write_lane(lane, frames)

    def _write_lane(self, lane: Lane, frames: list[Any], before: bytes = b"") -> None:
        """``Outbox.send`` on the lane (``before``: encoded answers written just ahead of
        ``frames``); a lane that fails is dropped."""
        if lane.closed:
            return  # dropped (by an earlier write of this batch)
        try:
            lane.outbox.send(frames, before)
        except OSError as exc:
            log.warning("answering on lane %d failed (%s); closing it", lane.fd, exc)
            self._drop_lane(lane)

    def _drop_lane(self, lane: Lane) -> None:
        """Close a lane and free the output blocks its client had not released."""
        if self.lanes is not None:
            self.lanes.drop(lane)
        with self.lock:  # a decoupled model's threads add to it (``_stream_lane``)
            held = list(lane.held)
            lane.held.clear()
        self._free_blocks(held)

    def _close_lanes(self) -> None:
        """``LaneBye`` on every lane, then no more lanes (the arena goes with the process)."""
        lanes, self.lanes = self.lanes, None
        if lanes is None:
            return
        try:
            lanes.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            log.exception("closing the lanes failed")
