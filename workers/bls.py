"""A worker's BLS calls (business logic scripting): a model asks the router to run a request
on any model, through that model's own scheduler, and waits for the response(s).

Inputs travel as frames (small) or blocks of this worker's output arena (large: the target
worker reads them in place; they are freed after the call's final reply, or, when that reply
says ``inputs_held`` (the call ended while the target still reads them) or the call was left
before its final reply, once the router says ``inputs_free``). Outputs come back as
frames, or as blocks of the target worker's arena, copied here and given back at once
(``BlsDone``). Every failure is a response with an error, never an exception out of the call.

A call to a model version the router publishes on lanes goes straight to one of the target's
workers instead (``_over_lane``, ``workers.lanecalls``): checked here with the router's
validation, its inputs in this worker's arena read in place there, its outputs copied and given
back with ``Release``, its statistics sent to the router (with the answer of the batch that
made it, when the main thread made it inside ``execute``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from shoal.proto import dtypes, streamflow, wire
from shoal.proto.errors import ErrorCode, ServingError, WorkerDied, failure_reason
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.validation import validate
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper
from shoal.workers.cudaarena import DeviceMapper
from shoal.workers.inbox import Inbox
from shoal.workers.lanecalls import LOST, LaneCalls, OutLane, Route
from shoal.workers.outbox import encode_joined
from shoal.workers.tensors import OutputWriter

Array = Any
ACK_EVERY = streamflow.ACK_EVERY
"""A decoupled call's responses the model takes between two acknowledgements (``BlsDone``):
the router sends at most its window (64, ``server.frontproc.calls.STREAM_WINDOW``) ahead of
them, so a model reading slowly slows its target down instead of filling this process."""
DEFER_MAX = 256
"""Lane calls' statistics kept for the batch's answer at most: more are sent together at once
(an ``execute`` making thousands of calls neither holds them all nor hides them from the
router's statistics until it returns)."""
UNLIMITED = 1 << 30
"""The acknowledgement of a call nobody reads any more: no window from then on."""
Reply = tuple[dict[str, Array] | None, ServingError | None, dict[str, Any], bool]
"""(outputs, error, parameters, final) of one response; outputs None: no response (the end)."""


class BlsClient:
    def __init__(
        self,
        *,
        inbox: Inbox,
        send: Callable[[list[Any]], None],
        lock: Any,
        writer: OutputWriter,
        arena: Arena,
        mapper: Mapper,
    ) -> None:
        self.inbox = inbox
        self.send = send
        self.lock = lock
        self.writer = writer
        self.arena = arena
        self.mapper = mapper
        self.device_mapper: DeviceMapper | None = None
        """A GPU instance's reader of BLS outputs left in another worker's CUDA arena."""
        self.lanes: LaneCalls | None = None
        """Lanes to other models' workers (``workers.lanecalls``); None: every call through
        the router."""
        self.defer: Callable[[], bool] = lambda: False
        """Whether a lane call's statistics wait for the answer of the batch in flight (the
        main thread inside ``execute``)."""
        self._stats: list[wpb.LaneStat] = []
        self._lane_kept: dict[int, list[Block]] = {}
        """Input blocks of lane calls left before their answer, by call id."""
        self._kept: dict[int, list[Block]] = {}
        """Input blocks of calls that ended while a worker may still read them, by call id:
        freed by the router's ``inputs_free`` (or a final reply that does not hold them)."""

    def call(
        self,
        model: str,
        version: int,
        inputs: Sequence[tuple[str, Array]],
        outputs: Sequence[str],
        *,
        parameters_json: str = "",
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        timeout_us: int = 0,
        decoupled: bool = False,
        trace_id: int = 0,
        on_call: Callable[[int], None] | None = None,
        gpu_outputs: bool = False,
    ) -> Iterator[Reply]:
        """The responses to one request (one unless ``decoupled``); ``on_call`` gets the
        call's id once it is sent (for ``cancel``). ``gpu_outputs``: outputs a GPU model
        leaves on the device come back as CuPy arrays (``preferred_memory`` GPU), when this
        instance can read them."""
        sequence = correlation_id if isinstance(correlation_id, str) else int(correlation_id)
        lanes = self.lanes
        route = None
        if lanes is not None and not (decoupled or int(timeout_us) > 0 or int(flags) or trace_id or sequence):
            route = lanes.route(model, version, parameters_json)
        env = wire.envelope(0)
        # a call going over a lane is built in the lane's message itself (no copy of it)
        req = env.infer.requests.add() if route is not None else env.bls_call.request
        req.request_id = request_id
        if isinstance(correlation_id, str):
            req.correlation_id_str = correlation_id
        else:
            req.correlation_id = int(correlation_id)
        req.flags = int(flags)
        req.trace_id = trace_id
        req.outputs.extend(outputs)
        if gpu_outputs and self.device_mapper is not None:
            req.device_outputs.extend(outputs or ["*"])  # "*": every output of the model
        if parameters_json and parameters_json != "{}":
            req.parameters_json = parameters_json
        frames: list[Any] = []
        blocks: list[Block] = []
        try:
            for name, array in inputs:  # the writer locks the arena for large ones
                ref = req.inputs.add()
                self.writer.write(name, array, None, ref, frames)
                if ref.WhichOneof("location") == "shm":
                    s = ref.shm
                    blocks.append(Block(s.region, s.offset, s.nbytes, s.device))
        except ServingError as exc:
            self._free(blocks)
            yield None, exc, {}, True
            return
        if route is not None and lanes is not None:
            answer = self._over_lane(lanes, route, env, req, frames, blocks)
            if answer is not None:
                yield answer
                return
            # not executed there: the router takes it, inputs as they are (in the caller's
            # shapes: the lane's validation applied a target's ``reshape``)
            lane_req = req
            env = wire.envelope(0)
            req = env.bls_call.request
            req.CopyFrom(lane_req)
            if route.sig.reshapes:
                for ref, (_, array) in zip(req.inputs, inputs, strict=True):
                    del ref.shape[:]
                    ref.shape.extend(array.shape)
        call = env.bls_call
        call.model_name = model
        call.model_version = version
        call.decoupled = decoupled
        call.timeout_us = max(0, int(timeout_us))
        call.call_id = call_id = self.inbox.new_call()
        free_inputs = True  # nobody reads them until the call is sent
        ended = False  # the final reply came
        taken = 0  # responses the model took since the last acknowledgement
        try:
            self.send([env.SerializeToString(), *frames])
            if on_call is not None:
                on_call(call_id)
            free_inputs = False  # the target may read them: until a final reply that does not hold them
            while True:
                reply_env, reply_frames = self.inbox.reply(call_id)
                reply = reply_env.bls_reply
                if reply.inputs_free:
                    free_inputs = True
                    continue
                if reply.final:
                    ended = True
                    free_inputs = free_inputs or not reply.inputs_held
                yield self._decode(reply, reply_frames)
                if reply.final:
                    return
                if decoupled:  # the model took it and asks for the next: room for one more
                    taken += 1
                    if taken == ACK_EVERY:
                        self._ack(call_id, taken)
                        taken = 0
        finally:
            if decoupled and not ended:
                # left before the end (the iterator dropped): the rest flows unacknowledged
                # and is given back as orphans, as before the window (a cancel stops it)
                with contextlib.suppress(OSError):
                    self._ack(call_id, UNLIMITED)
            if free_inputs or not blocks:
                self._free(blocks)
            else:  # left before the final reply, or the target still reads them: kept before
                # the call's late replies become orphans (another thread may read them at once)
                with self.lock:
                    self._kept[call_id] = blocks
            self.inbox.forget(call_id)
            self.give_back_orphans()

    # ---- over lanes (``workers.lanecalls``) -------------------------------------------------

    def _over_lane(
        self,
        lanes: LaneCalls,
        route: Route,
        env: wpb.Envelope,
        req: wpb.Request,
        frames: list[Any],
        blocks: list[Block],
    ) -> Reply | None:
        """The call's answer from a worker of the target, its inputs freed; None when it was not
        executed there (the router takes it, inputs as they are). ``env``: the lane's message,
        holding ``req``."""
        sig = route.sig
        check = _Checked(req, frames)
        try:
            validate(sig, check)  # applies ``reshape``: the lane's message gets it
        except ServingError as exc:
            self._free(blocks)
            return None, exc, {}, True
        out = lanes.pick(route)
        if out is None:
            return None
        call_id = self.inbox.new_call()
        rid = lanes.new_id(out, call_id)
        if not rid:
            self.inbox.forget(call_id)
            return None
        env.request_id = rid
        if sig.reshapes:
            for ref, t in zip(req.inputs, check.inputs, strict=True):
                if t.shape != tuple(ref.shape):
                    del ref.shape[:]
                    ref.shape.extend(t.shape)
        t0 = time.monotonic_ns()
        stat = wpb.LaneStat(model_name=sig.name, model_version=sig.version, lane=out.path)
        answered = False
        try:
            lanes.send(out, env, frames)  # a lane that broke files LOST for the call
            reply, rframes = self.inbox.reply(call_id)
            answered = True
        finally:
            if not answered:  # left waiting (the router went away): the answer is an orphan
                stat.failure, stat.request_ns = "CANCELED", time.monotonic_ns() - t0
                self._report(stat)
                with self.lock:
                    self._lane_kept[call_id] = blocks
                left = self.inbox.drop(call_id)
                for m, _ in left:
                    self.lane_orphan(out, call_id, None if m is LOST else m)
                if not left:
                    lanes.cancel(out, rid)
        self.inbox.forget(call_id)
        stat.request_ns = time.monotonic_ns() - t0
        if reply is LOST:
            if out.bye:  # never executed: the router takes it
                stat.withdrawn = True
                self._report(stat)
                return None
            self._free(blocks)
            err = WorkerDied(f"{out.label} (pid {out.pid}) died while executing the request")
            stat.failure = failure_reason(err)
            self._report(stat)
            return None, err, {}, True
        self._free(blocks)
        answer = self._lane_answer(lanes, out, reply, rframes, stat, check.batch_size)
        self._report(stat)
        return answer

    def _lane_answer(
        self, lanes: LaneCalls, out: OutLane, env: wpb.Envelope, frames: list[Any], stat: wpb.LaneStat, batch_size: int
    ) -> Reply:
        if env.WhichOneof("body") != "infer_done" or len(env.infer_done.results) != 1:
            err = wire.to_error(env.failed) if env.WhichOneof("body") == "failed" else None
            if err is None:
                err = ServingError(f"{out.label}: malformed reply", code=ErrorCode.INTERNAL)
            stat.failure = failure_reason(err)
            return None, err, {}, True
        done = env.infer_done
        stat.queue_ns = done.queue_ns
        if not done.counted:  # (counted: the target batched it and counted the execution)
            stat.executed = True
            stat.compute_input_ns = done.compute_input_ns
            stat.compute_infer_ns = done.compute_infer_ns
            stat.compute_output_ns = done.compute_output_ns
            stat.batch_size = batch_size
        res = done.results[0]
        held = [ref.shm for ref in res.outputs if ref.WhichOneof("location") == "shm"]
        try:
            params = json.loads(res.parameters_json) if res.parameters_json else {}
            if res.HasField("error"):
                err = wire.to_error(res.error)
                stat.failure = failure_reason(err)
                return None, err, params, True
            outputs = {ref.name: self._array(ref, frames) for ref in res.outputs}
            stat.ok = True
            return outputs, None, params, True
        except ServingError as exc:
            stat.failure = failure_reason(exc)
            return None, exc, {}, True
        finally:
            if held:
                lanes.release(out, held)

    def lane_orphan(self, out: OutLane, call_id: int, env: wpb.Envelope | None) -> None:
        """The answer (None: the lane's end) of a lane call nobody waits for: its outputs go
        back, its inputs are free."""
        with self.lock:
            kept = self._lane_kept.pop(call_id, None)
        self._free(kept or [])
        if env is not None and env.WhichOneof("body") == "infer_done":
            held = [ref.shm for r in env.infer_done.results for ref in r.outputs if ref.WhichOneof("location") == "shm"]
            if held and self.lanes is not None:
                self.lanes.release(out, held)

    def _report(self, stat: wpb.LaneStat) -> None:
        """A lane call for the target's statistics (the router counts it as its own): kept
        for the answer of the batch the main thread executes (``take_stats``: one write, no
        wake-up of the router of its own), sent at once from any other thread, and sent
        together once ``DEFER_MAX`` wait (an ``execute`` making many calls)."""
        if self.defer():
            with self.lock:
                self._stats.append(stat)
                if len(self._stats) < DEFER_MAX:
                    return
                stats, self._stats = self._stats, []
        else:
            stats = [stat]
        env = wire.envelope(0)
        env.lane_stats.stats.extend(stats)
        self.send([env.SerializeToString()])

    def take_stats(self) -> bytes:
        """The statistics ``_report`` kept, as one encoded message (b"": none); the batch's
        answer is written after them, so a client that reads statistics after its answer
        sees them."""
        if not self._stats:
            return b""
        with self.lock:
            stats, self._stats = self._stats, []
        env = wire.envelope(0)
        env.lane_stats.stats.extend(stats)
        return encode_joined([env.SerializeToString()])

    def _ack(self, call_id: int, count: int) -> None:
        env = wire.envelope(0)
        done = env.bls_done
        done.ack_calls.append(call_id)
        done.ack_counts.append(count)
        self.send([env.SerializeToString()])

    def _free(self, blocks: list[Block]) -> None:
        if blocks:
            with self.lock:
                for b in blocks:
                    self.arena.free(b)

    def _decode(self, reply: wpb.BlsReply, frames: list[bytes]) -> Reply:
        try:
            if not reply.HasField("result"):
                return None, None, {}, reply.final
            res = reply.result
            params = json.loads(res.parameters_json) if res.parameters_json else {}
            if res.HasField("error"):
                return None, wire.to_error(res.error), params, reply.final
            out: dict[str, Array] = {}
            for ref in res.outputs:
                out[ref.name] = self._array(ref, frames)
            return out, None, params, reply.final
        finally:
            if reply.hold_id:
                self._done([reply.hold_id])

    def _array(self, ref: wpb.TensorRef, frames: list[bytes]) -> Array:
        dt = dtypes.by_protocol(ref.datatype)
        shape = tuple(ref.shape)
        count = dtypes.element_count(shape)
        where = ref.WhichOneof("location")
        if where == "frame":
            buf: Any = frames[ref.frame]
        elif where == "shm" and ref.shm.device >= 0:  # in the target's CUDA arena
            if self.device_mapper is None or dt.numpy is None or dt.protocol == "BYTES":
                raise ServingError(f"BLS output '{ref.name}' is in GPU memory, which this instance cannot read")
            return self.device_mapper.copy(ref.shm, dt.numpy, shape)
        elif where == "shm":
            s = ref.shm
            view = self.mapper.view(Block(s.region, s.offset, s.nbytes, s.device))
            try:
                buf = bytes(view)  # the target's block is given back right after this reply
            finally:
                view.release()
        else:
            raise ServingError(f"BLS output '{ref.name}' carries no data", code=ErrorCode.INTERNAL)
        if dt.protocol == "BYTES":
            return dtypes.deserialize_bytes(buf, count, name=ref.name).reshape(shape)
        if dt.numpy is None:
            raise ServingError(f"BLS output '{ref.name}': datatype {dt.protocol} needs ml_dtypes")
        return np.frombuffer(buf, dtype=dt.numpy, count=count).reshape(shape)

    def _done(self, hold_ids: list[int]) -> None:
        env = wire.envelope(0)
        env.bls_done.hold_ids.extend(hold_ids)
        self.send([env.SerializeToString()])

    def cancel(self, call_id: int) -> None:
        """Tell the router that nobody listens to this call any more (it cancels it)."""
        env = wire.envelope(0)
        env.bls_done.cancel_calls.append(call_id)
        self.send([env.SerializeToString()])

    def control(
        self,
        action: int,
        model: str,
        *,
        config_json: str = "",
        dependents: bool = False,
        version: int = -1,
        files: Mapping[str, bytes] | None = None,
    ) -> tuple[bool, str]:
        """Model management through the router: (ok, error)."""
        env = wire.envelope(0)
        m = env.model_control
        m.action = action
        m.model_name = model
        m.config_json = config_json
        m.unload_dependents = dependents
        m.model_version = version
        for path, data in (files or {}).items():
            m.files[path] = bytes(data)
        m.call_id = call_id = self.inbox.new_call()
        try:
            self.send([env.SerializeToString()])
            reply_env, _ = self.inbox.reply(call_id)
        finally:
            self.inbox.forget(call_id)
        return reply_env.control_reply.ok, reply_env.control_reply.error

    def give_back_orphans(self) -> None:
        """Replies nobody waited for (an abandoned call): their held outputs go back, and
        inputs kept for a reader are freed once the router says none is left."""
        holds = []
        while self.inbox.orphans:
            env, _ = self.inbox.orphans.popleft()
            reply = env.bls_reply
            if reply.hold_id:
                holds.append(reply.hold_id)
            if reply.inputs_free or (reply.final and not reply.inputs_held):
                with self.lock:
                    kept = self._kept.pop(reply.call_id, None)
                self._free(kept or [])
        if holds:
            self._done(holds)


class _Input:
    """A BLS input as ``proto.validation`` reads it."""

    __slots__ = ("name", "datatype", "shape", "nbytes")

    def __init__(self, ref: wpb.TensorRef, frames: list[Any]) -> None:
        self.name = ref.name
        self.datatype = ref.datatype
        self.shape: tuple[int, ...] = tuple(ref.shape)
        where = ref.WhichOneof("location")
        self.nbytes = ref.shm.nbytes if where == "shm" else len(frames[ref.frame]) if where == "frame" else 0


class _Checked:
    """A BLS call's request as ``proto.validation`` reads it."""

    __slots__ = ("id", "inputs", "outputs", "batch_size")

    def __init__(self, req: wpb.Request, frames: list[Any]) -> None:
        self.id = req.request_id
        self.inputs = [_Input(ref, frames) for ref in req.inputs]
        self.outputs = [_Named(n) for n in req.outputs] if req.outputs else None
        self.batch_size = 1


class _Named:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name
