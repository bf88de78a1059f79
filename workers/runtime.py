"""``WorkerRuntime``: a worker's receive loop. One model instance, one thread.

Protocol (``proto/worker.proto``): on start the worker sends ``Ready(loaded=false)``; the
router answers ``Load``; the worker loads its backend and sends ``Ready(loaded=true)`` or
``Failed``; then it serves ``Infer`` (answering ``InferDone`` with the same request id),
``Release`` (frees output blocks), ``Forget`` and ``Probe`` until ``Shutdown``; a thread
sends heartbeats (``Pong``) meanwhile. Frontend processes send ``Infer``, ``Release`` and
``Cancel`` on the model's lane socket too (``workers.lanes``); the same loop answers them there
(a batching model's lane batches and every lane answer: ``workers.lanerun``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from shoal.proto import dtypes, framing, stopmark, streamflow, wire
from shoal.proto.batchpolicy import worker_batchable
from shoal.proto.errors import ErrorCode, ServingError, from_exception
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper
from shoal.workers import gpumem, hostpolicy, warmup
from shoal.workers.backends.base import (
    Backend,
    Device,
    ModelSpec,
    WorkRequest,
    WorkResponse,
    spec_from_load,
)
from shoal.workers.backends.registry import backend_class
from shoal.workers.bls import BlsClient
from shoal.workers.clientshm import ClientRegions
from shoal.workers.cudaarena import CudaArena, DeviceMapper
from shoal.workers.custommetrics import MetricsClient
from shoal.workers.inbox import Inbox
from shoal.workers.lanebatch import LaneBatcher
from shoal.workers.lanecalls import LaneCalls
from shoal.workers.lanerun import LaneRuns
from shoal.workers.lanes import CLOSED, Lane, LaneServer
from shoal.workers.outbox import Outbox
from shoal.workers.tensors import OutputWriter, read_input

log = logging.getLogger("shoal.worker")


def _apply_priority(priority: int) -> None:
    """``optimization.priority``: PRIORITY_MIN lowers the worker's CPU priority (nice +10);
    PRIORITY_MAX raises it (nice -5) where the server may (root or CAP_SYS_NICE)."""
    if priority == mc.ModelOptimizationPolicy.PRIORITY_MIN:
        os.nice(10)
    elif priority == mc.ModelOptimizationPolicy.PRIORITY_MAX:
        try:
            os.nice(-5)
        except PermissionError:
            log.warning("PRIORITY_MAX: not allowed to raise this worker's CPU priority; running at default")


HEARTBEAT_SUFFIX = b"/hb"
_LOG_PER_S = 5
_CLIENT_ERRORS = frozenset(
    {ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND, ErrorCode.FAILED_PRECONDITION, ErrorCode.PERMISSION_DENIED}
)


class Heartbeat(threading.Thread):
    """Sends ``Pong`` on its own connection (``<identity>/hb``) every ``interval_ms``. It needs
    the GIL like any Python thread, so it stops when the process is stopped (SIGSTOP) or when a
    backend holds the GIL without end; the router then kills and replaces the worker."""

    def __init__(self, endpoint: str, identity: bytes, interval_ms: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.endpoint = endpoint
        self.identity = identity + HEARTBEAT_SUFFIX
        self.interval_s = interval_ms / 1000
        self.done = threading.Event()

    def run(self) -> None:
        try:
            conn = framing.Connection(self.endpoint, self.identity)
        except OSError:
            return  # the router is gone; the main loop sees it too
        beat = wire.envelope(0)
        beat.pong.SetInParent()
        msg = [beat.SerializeToString()]
        try:
            while True:
                try:
                    conn.send(msg)  # blocks while the router does not read: beats resume after
                except OSError:
                    return
                if self.done.wait(self.interval_s):
                    return
        finally:
            conn.close()


def _lane_cancelled(inbox: Inbox, rid: int, index: int, lane: Lane) -> bool:
    return lane.dead or inbox.is_cancelled(rid, index)


class WorkerRuntime(LaneRuns):
    """Owns the connection to the router, the backend, the output arena and the input mapper."""

    def __init__(self, *, endpoint: str, identity: bytes, heartbeat_ms: int = 0) -> None:
        self.endpoint = endpoint
        self._stop_mark = stopmark.path_for(endpoint)
        self.identity = identity
        self.heartbeat_ms = heartbeat_ms
        self.conn: framing.Connection | None = None
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        """Every message to the router goes through it, from any thread (``_send``)."""
        self.lock = threading.RLock()
        """Held for the output arena and client regions: a decoupled model writes responses
        from its own threads. Not taken for a response whose outputs are all inline: a lock
        every sending thread takes for every response makes them a convoy (``outbox``)."""
        self.decoupled = False
        self.backend: Backend | None = None
        self.spec: ModelSpec | None = None
        self.mapper = Mapper()
        self.regions = ClientRegions()
        self.arena: Arena | None = None
        self.writer: OutputWriter | None = None
        self.output_types: dict[str, dtypes.DType] = {}
        self.output_dims: dict[str, tuple[int, ...]] = {}
        self.batching = False
        self.busy = False
        """Executing a batch (a SIGTERM then waits for its answer)."""
        self._log_window = 0.0
        self._log_count = 0
        self._log_dropped = 0
        self.stop_requested = False
        self._checker: concurrent.futures.ThreadPoolExecutor | None = None
        """Runs the model's readiness checks (``_ready_check``)."""
        self.lanes: LaneServer | None = None
        """The model's lane socket (``Ready.lane``) and its connections."""
        self.lane_batcher: LaneBatcher | None = None
        """Batches the lane requests of a dynamic-batching model (``workers.lanebatch``)."""

    def on_sigterm(self) -> None:
        """SIGTERM: exit now when idle, else right after answering the current batch; unless
        the router got it too (its ``stopmark`` appears within 0.2 s): then serve on, until
        the router, done draining, stops this worker."""
        if self.stop_requested:
            return
        if stopmark.wait_for(self._stop_mark):
            return
        if self.busy:
            self.stop_requested = True
            return
        raise SystemExit(0)

    def run(self) -> int:
        """Serve until ``Shutdown`` or the router goes away; returns the exit status."""
        self.conn = conn = framing.Connection(self.endpoint, self.identity)
        self.outbox = Outbox(conn.sock)
        self.inbox = inbox = Inbox(conn)
        inbox.on_ready_check = self._ready_check
        # output blocks read are freed by whichever thread reads the release, at once: a model
        # sending from inside ``execute`` (the main thread) would otherwise fill the arena
        inbox.on_release = self._release
        heartbeat = None
        if self.heartbeat_ms > 0:
            heartbeat = Heartbeat(self.endpoint, self.identity, self.heartbeat_ms)
            heartbeat.start()
        hello = wire.envelope(0)
        hello.ready.pid = os.getpid()
        self._send([hello.SerializeToString()])
        try:
            while True:
                try:
                    env, frames, lane = inbox.next()
                except EOFError:
                    log.info("the router closed its connection; exiting")
                    return 0
                kind = env.WhichOneof("body")
                if kind == "infer":
                    if lane is not None and lane.dead:
                        continue  # its client left: nobody waits for it
                    self.busy = True
                    try:
                        batcher = self.lane_batcher if lane is not None and not self.decoupled else None
                        batch = batcher.gather((env, frames, lane)) if batcher is not None else None
                        if batch is not None and self.backend is not None and self.backend.pipelined:
                            self._pipeline_lanes(batch)
                        elif batch is not None:
                            self._infer_lanes(batch)
                        else:
                            self._infer(env, frames, lane)
                    finally:
                        self.busy = False
                    bls = self.spec.bls if self.spec is not None else None
                    if bls is not None and inbox.orphans:  # late BLS replies: held outputs, kept inputs
                        bls.give_back_orphans()
                    if self.stop_requested:
                        log.info("SIGTERM: exiting after answering the batch in flight")
                        return 0
                elif kind == "cancel":
                    pass  # the inbox has noted it
                elif lane is not None:  # the inbox files nothing else of a lane's but its end
                    if env is CLOSED:
                        self._drop_lane(lane)
                    else:
                        log.error("unexpected message %s on a lane", kind)
                elif kind == "forget":
                    log.debug("unmapping client regions %s", list(env.forget.region_ids))
                    self.regions.forget(env.forget.region_ids)
                    for prefix in env.forget.arena_prefixes:
                        self.mapper.forget_prefix(prefix)
                        if self.spec is not None and self.spec.bls is not None and self.spec.bls.device_mapper:
                            self.spec.bls.device_mapper.forget_prefix(prefix)
                elif kind == "probe":
                    self._probe(env)
                elif kind == "load":
                    self._load(env)
                elif kind == "shutdown":
                    return 0
                else:
                    log.error("unexpected message %s", kind)
        finally:
            # first: their clients send the requests left another way; a decoupled model's
            # lanes only hear it (the model's threads may still be streaming on them until
            # its finalize returns: ``close``)
            if self.decoupled and self.lanes is not None:
                self.lanes.bye()
            else:
                self._close_lanes()
            if heartbeat is not None:
                heartbeat.done.set()
                heartbeat.join(1.0)
            self.close()

    def _call_over_lanes(self, bls: BlsClient) -> None:
        """The model's BLS calls go over lanes where the router publishes them
        (``workers.lanecalls``)."""
        inbox, lanes = self.inbox, self.lanes
        assert inbox is not None and lanes is not None
        calls = LaneCalls(lanes.path, inbox.watch, inbox.unwatch, inbox.deliver, bls.lane_orphan)
        bls.lanes = inbox.calls = calls
        main = threading.get_ident()
        bls.defer = lambda: self.busy and threading.get_ident() == main
        inbox.services["lane_routes"] = lambda env: calls.update(env.lane_routes)

    def _load(self, env: wpb.Envelope) -> None:
        req = env.load
        reply = wire.envelope(env.request_id)
        try:
            config = mc.ModelConfig()
            config.ParseFromString(req.model_config)
            # a GPU worker's CUDA_VISIBLE_DEVICES puts its GPU first: it is device 0 here
            device = Device(req.device_kind or "CPU", 0 if req.device_kind == "GPU" else -1)
            self.spec = spec_from_load(req, config, req.instance_name, device)
            self.regions.gpu_order = list(req.gpu_order)
            self.regions.mapped = req.client_shm_mapped
            _apply_priority(req.priority)
            hostpolicy.apply(req.host_policy, req.host_policy_name)  # before the backend starts its threads
            self.output_types = {o.name: dtypes.BY_CONFIG_NUMBER[o.data_type] for o in config.output if o.data_type}
            # outputs with ``reshape``: the model makes the reshape shape, clients see ``dims``
            self.output_dims = {o.name: tuple(o.dims) for o in config.output if o.HasField("reshape")}
            self.batching = config.max_batch_size > 0
            self.decoupled = config.model_transaction_policy.decoupled
            self.arena = Arena(
                req.arena_prefix,
                segment_bytes=req.arena_bytes,
                max_bytes=req.arena_bytes * 16,
                setting="--worker-arena-bytes: a worker's outputs may use 16 times it",
            )
            self.writer = OutputWriter(self.arena, req.inline_max_bytes, self.regions, self.lock)
            if device.is_gpu:  # outputs ensemble steps on GPUs read in place (no memory until used)
                server_gpu = req.gpu_order[0] if req.gpu_order else req.device_index
                self.writer.device_arena = CudaArena(
                    req.arena_prefix, 0, server_gpu, segment_bytes=req.arena_bytes, max_bytes=req.arena_bytes * 16
                )
            assert self.inbox is not None
            bls = BlsClient(
                inbox=self.inbox,
                send=self._send,
                lock=self.lock,
                writer=self.writer,
                arena=self.arena,
                mapper=self.mapper,
            )
            if device.is_gpu:
                bls.device_mapper = DeviceMapper(self.regions.local_device)
            self.spec = dataclasses.replace(self.spec, bls=bls, metrics=MetricsClient(self.inbox, self._send))
            self.backend = backend_class(config.backend).load(self.spec)
            if device.is_gpu and req.HasField("gpu_load_limit"):
                try:
                    gpumem.check_load_limit(req.instance_name, req.device_index, req.gpu_load_limit)
                except BaseException:
                    self.backend.close()  # its device memory goes back before the refusal
                    self.backend = None
                    raise
            if config.model_warmup:
                where = f"model '{req.model_name}' instance '{req.instance_name}'"
                warmup.run(self.backend, config, self.spec.model_dir, lambda m: log.info("%s: %s", where, m))
            reply.ready.pid = os.getpid()
            reply.ready.loaded = True
            reply.ready.has_ready_check = self.backend.has_ready_check
            if self.lanes is None and req.lanes:
                self.lanes = LaneServer.open(self.endpoint)
                if self.lanes is not None:
                    self.inbox.attach(self.lanes)
                    self._call_over_lanes(bls)
                    if worker_batchable(config) and not self.decoupled:
                        self.lane_batcher = LaneBatcher(config, self.inbox)
            if self.lanes is not None:
                reply.ready.lane = self.lanes.path
        except BaseException as exc:  # noqa: BLE001 - every load failure is reported
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            err = from_exception(exc)
            if isinstance(exc, ServingError):  # described already (a backend logged its model's traceback)
                log.error("loading %s failed: %s", req.model_name, err.message)
            else:  # unexpected: where it came from matters
                log.exception("loading %s failed", req.model_name)
            wire.failed(err, reply.failed)
        self._send([reply.SerializeToString()])

    def _send_encoded(self, data: bytes) -> None:
        assert self.outbox is not None
        self.outbox.send((), data)

    def _send(self, frames: list[Any]) -> None:
        """Write one message (from any thread; returns once it is written)."""
        assert self.outbox is not None
        self.outbox.send(frames)

    def _fill(self, req: WorkRequest, resp: WorkResponse, result: wpb.Result, out_frames: list[Any], dest: Any) -> None:
        """One response into ``result`` (outputs written, or its error)."""
        if resp.error is not None:
            wire.failed(resp.error, result.error)
            return
        assert self.writer is not None
        try:
            self._write_outputs(req, resp.outputs, result, out_frames, self.writer, dest)
            params = resp.parameters
            if params:
                result.parameters_json = params if isinstance(params, str) else json.dumps(params)
        except ServingError as exc:
            self._free_result(result)
            del result.outputs[:]
            wire.failed(exc, result.error)

    def _stream(
        self,
        rid: int,
        req: WorkRequest,
        dest: Any,
        sent: itertools.count[int],
        lane: Lane | None,
        resp: WorkResponse | None,
        final: bool,
    ) -> None:
        """A decoupled model's response (from any thread): written and sent at once, once
        the request's responses still unread by their consumer, the router's or a frontend's
        on ``lane``, are few enough (``proto.streamflow``: a slow client slows the model down
        instead of filling the arena). The final response never waits. ``sent``
        counts the request's responses (``next`` is atomic: threads may send for one
        request at once). On a lane, output blocks become the lane's until its client
        releases them, and a lane whose client left (or whose write fails) drops the
        response (the model's ``is_cancelled`` turns true)."""
        inbox = self.inbox
        number = next(sent) if not final else -1
        if number >= 0 and inbox is not None:
            gone = (lambda: lane.dead) if lane is not None else None
            inbox.wait_credit(rid, req.id, number, gone)
        if lane is not None and lane.dead:
            self._stream_ended(inbox, rid, req, final)
            return
        env = wire.envelope(rid)
        msg = env.streamed
        msg.index = req.id
        msg.final = final
        out_frames: list[Any] = []
        if resp is not None:
            # no lock for the common small response (a decoupled model's sending threads
            # would queue on it: 37% of a worker's samples at 8 lane streams); the writer
            # locks the arena if it needs it
            writer = self.writer
            before = writer.blocks_out if writer is not None else -1
            if dest is None:
                self._fill(req, resp, msg.result, out_frames, None)
            else:
                with self.lock:  # the client regions are shared with the main loop
                    self._fill(req, resp, msg.result, out_frames, dest)
                    self.regions.finish_writes()
            in_arena = writer is None or writer.blocks_out != before
            if lane is not None and in_arena and not self._lane_holds(lane, msg):
                self._stream_ended(inbox, rid, req, final)
                return
            if number >= 0 and in_arena and inbox is not None:
                nbytes = sum(r.shm.nbytes for r in msg.result.outputs if r.HasField("shm"))
                if nbytes >= streamflow.NOTED:
                    inbox.note_sent(rid, req.id, number, nbytes)
        frames = [env.SerializeToString(), *out_frames]
        if lane is None:
            self._send(frames)
        else:
            try:
                lane.outbox.send(frames)
            except OSError:
                pass  # the client went away: the inbox sees the lane end and the main thread drops it
        self._stream_ended(inbox, rid, req, final)

    def _lane_holds(self, lane: Lane, msg: wpb.Streamed) -> bool:
        """(any thread) The response's arena blocks become ``lane``'s until its client
        releases them; False (and freed) when the main thread has dropped the lane meanwhile
        (``_drop_lane`` takes the lane's blocks under ``lock``)."""
        blocks = [Block(r.shm.region, r.shm.offset, r.shm.nbytes, r.shm.device)
                  for r in msg.result.outputs if r.HasField("shm")]  # fmt: skip
        if not blocks:
            return True
        with self.lock:
            if lane.closed:
                self._free_blocks(blocks)
                return False
            lane.held.update(blocks)
        return True

    @staticmethod
    def _stream_ended(inbox: Inbox | None, rid: int, req: WorkRequest, final: bool) -> None:
        if final and inbox is not None:
            inbox.forget_cancelled(rid, req.id)
            inbox.forget_stream(rid, req.id)

    def _infer(self, env: wpb.Envelope, frames: list[bytes], lane: Lane | None = None) -> None:
        """Execute a batch and answer it, to the router or on ``lane`` (a frontend's)."""
        reply = wire.envelope(env.request_id)
        done = reply.infer_done
        out_frames: list[Any] = []
        backend, writer = self.backend, self.writer
        blocks_before = writer.blocks_out if writer is not None else 0
        try:
            if backend is None or writer is None:
                raise ServingError("model is not loaded")
            t0 = time.monotonic_ns()
            backend.begin_batch()
            try:
                work, dests = self._read_batch(env, frames, backend, lane)
            finally:
                self.regions.finish_reads()  # large inputs read into the backend's memory on threads
            t1 = time.monotonic_ns()
            responses = backend.execute(work)
            t2 = time.monotonic_ns()
            rescheduled = [req.id for req in work if req.rescheduled]
            if rescheduled:
                done.rescheduled.extend(rescheduled)
            # a decoupled model's responses went through each request's sender
            expected = 0 if self.decoupled else len(work)
            if len(responses) != expected:
                raise ServingError(f"backend returned {len(responses)} responses where {expected} were expected")
            if responses:
                with self.lock:
                    for req, resp, dest in zip(work, responses, dests, strict=True):
                        result = done.results.add()
                        result.id = req.id
                        self._fill(req, resp, result, out_frames, dest)
                    self.regions.finish_writes()  # outputs copied into CUDA regions
            t3 = time.monotonic_ns()
            done.compute_input_ns = t1 - t0
            done.compute_infer_ns = t2 - t1
            done.compute_output_ns = t3 - t2
        except Exception as exc:  # noqa: BLE001 - a failed batch is reported, never fatal
            err = from_exception(exc)
            self._log_failure(err)
            with self.lock:
                for res in done.results:
                    self._free_result(res)
            reply.ClearField("infer_done")
            out_frames = []
            wire.failed(err, reply.failed)
        bls = self.spec.bls if self.spec is not None else None
        stats = bls.take_stats() if bls is not None else b""  # the model's lane calls: counted first
        if lane is None:
            assert self.outbox is not None
            self.outbox.send([reply.SerializeToString(), *out_frames], stats)
        else:
            if stats:
                self._send_encoded(stats)
            # only an answer that wrote arena blocks names blocks the lane holds
            held = writer is None or writer.blocks_out != blocks_before
            self._answer_lane(lane, reply, out_frames, held_blocks=held)
        if not self.decoupled and self.inbox is not None and self.inbox.cancelled:
            self.inbox.forget_cancelled(env.request_id)

    def _read_batch(
        self, env: wpb.Envelope, frames: list[bytes], backend: Backend, lane: Lane | None = None
    ) -> tuple[list[WorkRequest], list[Any]]:
        """The batch's requests with their inputs, and where each wants its outputs (a
        decoupled model's responses go where the batch came from: the router, or ``lane``)."""
        work: list[WorkRequest] = []
        dests: list[Any] = []
        inbox = self.inbox
        assert inbox is not None
        device_ok, into, mapper, regions = backend.device_inputs, backend.host_input, self.mapper, self.regions
        views = device_ok and backend.device_views
        reads_cancel = backend.reads_cancel
        for r in env.infer.requests:
            inputs = {ref.name: read_input(ref, frames, mapper, regions, device_ok, into, views) for ref in r.inputs}
            dests.append(r.output_shm)
            wr = WorkRequest(
                id=r.id,
                inputs=inputs,
                requested_outputs=list(r.outputs),
                parameters=r.parameters_json or {},
                request_id=r.request_id,
                correlation_id=r.correlation_id_str or r.correlation_id,
                flags=r.flags,
                trace_id=r.trace_id,
            )
            if reads_cancel:
                if lane is None:
                    wr.cancelled = functools.partial(inbox.is_cancelled, env.request_id, r.id)
                else:  # a lane's client that went away cancels its requests too
                    wr.cancelled = functools.partial(_lane_cancelled, inbox, env.request_id, r.id, lane)
            if r.device_outputs or (device_ok and r.output_shm):
                # outputs for CUDA regions (a backend reading device inputs may leave them on the
                # device), and those the next GPU step or a BLS caller reads from the CUDA arena
                # (any backend: a GPU tensor goes there, a host array through host memory)
                shm = r.output_shm  # by key: a protobuf map's items() is Python code (0.6 us more a request)
                cuda_shm = frozenset([k for k in shm if shm[k].device >= 0] if device_ok else ())
                if r.device_outputs:
                    on_gpu = self.output_types.keys() if "*" in r.device_outputs else r.device_outputs
                    cuda_shm = cuda_shm.union(on_gpu)
                wr.device_outputs = cuda_shm
            if self.decoupled:
                dest = r.output_shm if len(r.output_shm) else None
                wr.send = functools.partial(self._stream, env.request_id, wr, dest, itertools.count(), lane)
            work.append(wr)
        return work, dests

    def _log_failure(self, err: ServingError) -> None:
        """A request's own fault (bad data) is logged at verbose level only; a backend's at
        ERROR; either at most ``_LOG_PER_S`` lines a second."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._log_dropped:
                log.warning("%d failed batches were not logged", self._log_dropped)
            self._log_window, self._log_count, self._log_dropped = now, 0, 0
        self._log_count += 1
        if self._log_count > _LOG_PER_S:
            self._log_dropped += 1
            return
        level = logging.DEBUG if err.code in _CLIENT_ERRORS else logging.ERROR
        log.log(level, "%s: batch failed: %s", self.spec.instance_name if self.spec else "?", err.message)

    def _write_outputs(
        self,
        req: WorkRequest,
        outputs: dict[str, Any],
        result: wpb.Result,
        out_frames: list[Any],
        writer: OutputWriter,
        dest: Any,
    ) -> None:
        names = req.requested_outputs or list(outputs)
        for name in names:
            if name not in outputs:
                model = self.spec.name if self.spec else "?"
                raise ServingError(f"model '{model}' did not produce output '{name}'")
            target = dest[name] if dest is not None and name in dest else None
            array = outputs[name]
            if name in self.output_dims:
                array = self._unreshape(name, array)
            on_gpu = target is None and name in req.device_outputs  # an ensemble step on a GPU reads it
            writer.write(name, array, self.output_types.get(name), result.outputs.add(), out_frames, target, on_gpu)

    def _unreshape(self, name: str, array: Any) -> Any:
        """The model's output (in its ``reshape`` shape) in the configured ``dims``."""
        dims = list(self.output_dims[name])
        lead = [array.shape[0]] if self.batching and array.ndim else []
        size = int(array.size)
        known = 1
        for d in lead + [d for d in dims if d != -1]:
            known *= d
        if -1 in dims:
            dims[dims.index(-1)] = size // known if known else 0
        try:
            return array.reshape(lead + dims)
        except ValueError:
            want = lead + list(self.output_dims[name])
            raise ServingError(f"output '{name}' of shape {list(array.shape)} cannot be reshaped to {want}") from None

    def _free_result(self, result: wpb.Result) -> None:
        if self.arena is None:
            return
        self._free_blocks(
            Block(ref.shm.region, ref.shm.offset, ref.shm.nbytes, ref.shm.device)
            for ref in result.outputs
            if ref.WhichOneof("location") == "shm"
        )

    def _ready_check(self, rid: int) -> None:
        """Answer a ``ReadyCheck`` from a thread of its own (a check may take a while)."""
        if self._checker is None:
            self._checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoal-ready")
        self._checker.submit(self._answer_ready, rid)

    def _answer_ready(self, rid: int) -> None:
        reply = wire.envelope(rid)
        backend = self.backend
        ready, why = backend.check_ready() if backend is not None else (False, "the model is not loaded")
        reply.ready_answer.ready = ready
        reply.ready_answer.message = why
        try:
            self._send([reply.SerializeToString()])
        except OSError:
            pass  # the router went away: the main loop ends too

    def _probe(self, env: wpb.Envelope) -> None:
        reply = wire.envelope(env.request_id)
        try:
            self.regions.open(env.probe.region)
            reply.pong.SetInParent()
        except Exception as exc:  # noqa: BLE001 - a bad handle is the client's error, not ours
            wire.failed(from_exception(exc), reply.failed)
        self._send([reply.SerializeToString()])

    def _release(self, rel: wpb.Release, lane: Lane | None = None) -> None:
        """(the inbox's reading thread) Free output blocks the router (or a lane's client:
        only blocks it was sent) has read."""
        blocks = [Block(s.region, s.offset, s.nbytes, s.device) for s in rel.blocks]
        with self.lock:  # decoupled models' sending threads add to ``lane.held``
            if lane is not None:
                for block in [b for b in blocks if b not in lane.held]:
                    log.warning("a lane released a block it does not hold: %s", block)
                blocks = [b for b in blocks if b in lane.held]
                lane.held.difference_update(blocks)
            self._free_blocks(blocks)

    def _free_blocks(self, blocks: Iterable[Block]) -> None:
        """Free blocks of this worker's output arenas, host and CUDA (others are ignored)."""
        if self.arena is None:
            return
        cuda = self.writer.device_arena if self.writer is not None else None
        with self.lock:
            for block in blocks:
                if block.device < 0:
                    if self.arena.owns(block):
                        self.arena.free(block)
                elif cuda is not None and cuda.owns(block):
                    cuda.free(block)

    def close(self) -> None:
        if not self.decoupled:
            self._close_lanes()
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the backend failed")
            self.backend = None
        self._close_lanes()
        self.mapper.close()
        self.regions.close()
        if self.arena is not None:
            self.arena.close()
        if self.writer is not None and self.writer.device_arena is not None:
            self.writer.device_arena.close()
        if self.spec is not None and self.spec.bls is not None and self.spec.bls.device_mapper is not None:
            self.spec.bls.device_mapper.close()
        if self.conn is not None:
            self.conn.close()
