"""``SequenceBatcher``: stateful models. Every request of a sequence (``sequence_id``)
goes to the same instance and batch slot, in order, with the configured control inputs
(START, END, READY, CORRID) added as input tensors.

Slots: each instance has ``max(1, max_batch_size)`` (``max_candidate_sequences`` for the
oldest strategy); a sequence holds one from its START to its END. A START that finds no
free slot waits for one (backlog). A sequence idle for ``max_sequence_idle_microseconds``
is released; a later request for it is refused, as is one whose instance died since the
sequence started (the model's state for it is gone).

Requests of different sequences waiting for the same instance are executed together as
one batch (one request per sequence, oldest first, at most ``max_batch_size``). A batch
may wait up to the strategy's ``max_queue_delay_microseconds`` for more sequences'
requests: until ``minimum_slot_utilization`` of the slots (direct) or the largest
``preferred_batch_size`` (oldest) is reached. With the direct strategy (and a batching
model) a sequence's requests always take the batch row of its slot, as in Triton: the
rows below the highest slot in the batch whose sequences sent nothing are "null"
requests (inputs of zeros shaped like a real request's, READY false, START/END false,
CORRID 0) whose results are dropped; they count in the batch size of the execution
statistics, not in the inference count.

Implicit state (``sequence_batching.state``): the router keeps each state output of a
sequence's last response and feeds it back as the state input of its next request (the
initial state on START: zeros, or ``initial_state.data_file`` under the model's
``initial_state/`` directory). State tensors are never returned to the client.

Iterative sequences (``iterative_sequence: true``; continuous batching, as Triton's
provisional feature): a request without a correlation ID is a sequence of its own (START
on its first execution); each time the model releases it with RESCHEDULE
(``request.set_release_flags`` of the Python backend) it is queued again for its slot,
with neither START nor END, so it is batched with other sequences' requests at whatever
iteration they are; its slot is freed when an execution ends without RESCHEDULE, which
also answers the client (a decoupled model streams its responses meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from shoal.proto import errortexts as T
from shoal.proto.errors import ErrorCode, ServingError, WorkerDied
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.dispatch.pool import InstancePool
from shoal.server.dispatch.worker import Worker
from shoal.server.scheduling.base import SchedulerBase
from shoal.server.scheduling.sequencetensors import Controls, initial_state, sequence_params, zeros_like
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult, InputTensor, RequestedOutput

log = logging.getLogger("shoal.sequence")

FLAG_START = 1
FLAG_END = 2
ITERATIVE_IDS = 1 << 62
"""Iterative sequences: the correlation IDs given to requests that came without one start
above this (Triton counts from 1, sharing the clients' range; this range fits INT64 and
UINT64 CORRID controls and stays clear of the ids clients use)."""


_Pending = tuple[InferRequest, "asyncio.Future[InferResult | ServingError]", int]
"""A request waiting for its instance, the future its sequence awaits, and its slot."""


@dataclass(slots=True)
class _InstanceQueue:
    pending: list[_Pending] = field(default_factory=list)
    running: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a request joins ``pending`` (wakes a batch waiting for its delay)."""
    first_ns: int = 0
    """Arrival of the oldest pending request (the queue delay counts from it)."""


@dataclass(slots=True)
class Sequence:
    corrid: int | str
    worker: Worker
    generation: int
    slot: int
    last_ns: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: dict[str, InputTensor] = field(default_factory=dict)
    """State input name -> the tensor fed with the next request."""


class SequenceBatcher(SchedulerBase):
    def __init__(
        self, pool: InstancePool, config: mc.ModelConfig, stats: ModelStats, model_dir: Path | None = None
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.name = config.name
        sb = config.sequence_batching
        if sb.HasField("oldest") and sb.oldest.max_candidate_sequences > 0:
            self.slots_per_instance = int(sb.oldest.max_candidate_sequences)
        else:
            self.slots_per_instance = max(1, config.max_batch_size)
        self.batching = config.max_batch_size > 0
        self.idle_ns = int(sb.max_sequence_idle_microseconds or 1_000_000) * 1000
        self.controls = Controls(config)
        self.iterative = sb.iterative_sequence
        """Requests may be released with RESCHEDULE and run again (``_run_sequence_request``)."""
        self._last_internal = 0
        self.states = list(sb.state)
        self.initial = {s.input_name: initial_state(s, self.batching, model_dir) for s in self.states}
        self._active: dict[int | str, Sequence] = {}
        self._free: dict[int, list[int]] = {}
        self._waiting: list[asyncio.Future[None]] = []
        self._expired: OrderedDict[int | str, str] = OrderedDict()
        self._runners: set[asyncio.Future[None]] = set()
        super().__init__()
        self._reaper: asyncio.Task[None] | None = None
        self._queues: dict[int, _InstanceQueue] = {}
        self.max_batch = max(1, config.max_batch_size)
        self.pinned = self.batching and not sb.HasField("oldest")
        """Direct strategy: each sequence's requests take the batch row of its slot."""
        if sb.HasField("oldest"):
            self.delay_ns = int(sb.oldest.max_queue_delay_microseconds) * 1000
            preferred = [int(p) for p in sb.oldest.preferred_batch_size if p > 0]
            self.target = min(self.max_batch, max(preferred, default=self.max_batch))
        else:
            self.delay_ns = int(sb.direct.max_queue_delay_microseconds) * 1000
            utilization = min(1.0, max(0.0, float(sb.direct.minimum_slot_utilization)))
            self.target = min(self.max_batch, max(1, math.ceil(utilization * self.slots_per_instance)))

    @property
    def pending(self) -> int:
        """Sequence starts waiting for a slot and requests waiting for their instance."""
        return len(self._waiting) + sum(len(q.pending) for q in self._queues.values())

    # ---- slots --------------------------------------------------------------------------

    def _free_slots(self, worker: Worker) -> list[int]:
        key = id(worker)
        if key not in self._free:
            self._free[key] = list(range(self.slots_per_instance - 1, -1, -1))
        return self._free[key]

    async def _acquire(self, corrid: int | str, now: int) -> Sequence:
        while True:
            ready = [w for w in self.pool.workers if w.ready]
            if not ready:
                raise ServingError(f"no instance of model '{self.name}' is ready", code=ErrorCode.UNAVAILABLE)
            best = max(ready, key=lambda w: len(self._free_slots(w)))
            free = self._free_slots(best)
            if free:
                seq = Sequence(corrid, best, best.generation, free.pop(), now)
                self._active[corrid] = seq
                return seq
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)  # backlog: wait for a sequence to end
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # woken, but its client went away: the slot is the next one's
                raise
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _release(self, seq: Sequence, why: str = "") -> None:
        """End ``seq`` and give its slot back, once: a sequence already replaced (a new START
        with its id) or already ended (its instance failed) is not released again."""
        if self._active.get(seq.corrid) is not seq:
            return
        del self._active[seq.corrid]
        self._free_slots(seq.worker).append(seq.slot)
        if why:
            self._expired[seq.corrid] = why
            while len(self._expired) > 10000:
                self._expired.popitem(last=False)
        self._wake_next()

    def _wake_next(self) -> None:
        """Let the oldest START waiting for a slot try again."""
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    # ---- requests -----------------------------------------------------------------------

    def _sequence_of(self, request: InferRequest) -> tuple[int | str, bool, bool, bool]:
        """``(sequence id, start, end, internal)``: with iterative sequences a request without
        a correlation ID is a sequence of its own (an id from a range clients are unlikely
        to use), started now and ended when the model releases it without RESCHEDULE."""
        if self.iterative and request.parameters.get("sequence_id", 0) in (0, ""):
            self._last_internal += 1
            while ITERATIVE_IDS + self._last_internal in self._active:
                self._last_internal += 1
            return ITERATIVE_IDS + self._last_internal, True, False, True
        return (*sequence_params(request, self.name), False)

    async def submit(self, request: InferRequest) -> InferResult:
        self._admission.check()
        corrid, start, end, internal = self._sequence_of(request)
        if self.batching and request.batch_size != 1:
            raise T.SEQUENCE_BATCH_SIZE(model=self.name)
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_idle())
        self._admission.enter()
        t0 = time.monotonic_ns()
        ok = False
        try:
            # refused before a slot is taken (e.g. a string id for an integer CORRID)
            controls = self.controls.tensors(corrid, start, end, request_id=request.id)
            seq = self._active.get(corrid)
            if start:
                if seq is not None:
                    self._release(seq)  # a new START ends the sequence that had this id
                self._expired.pop(corrid, None)
                seq = await self._acquire(corrid, t0)
            elif seq is None:
                why = self._expired.get(corrid)
                if why:  # Triton's text alone goes to the client
                    log.info("sequence %r of model '%s' %s; a request without START came", corrid, self.name, why)
                raise T.SEQUENCE_NO_START(sequence_id=corrid, model=self.name)
            async with seq.lock:
                if seq.worker.generation != seq.generation:
                    self._release(seq, "ended: its instance failed")
                    raise WorkerDied(
                        f"sequence {corrid!r} ended: the instance of model '{self.name}' running it failed"
                    )
                request.correlation_id = corrid
                if self.states and request.outputs is not None:
                    request.outputs.extend(RequestedOutput(s.output_name) for s in self.states)
                try:
                    result = await self._run_sequence_request(seq, request, controls, start, end)
                finally:
                    if internal:
                        self._release(seq)  # answered, failed or abandoned: its slot is free
                if end:
                    self._release(seq)
            if isinstance(result, ServingError):
                try:
                    raise result
                finally:
                    del result  # the error's traceback holds this frame: no cycle through the local
            ok = True
            return result
        finally:
            self._admission.leave()
            self.stats.request_done(ok, time.monotonic_ns() - t0, 0)

    async def _run_sequence_request(
        self, seq: Sequence, request: InferRequest, controls: list[InputTensor], start: bool, end: bool
    ) -> InferResult | ServingError:
        """Execute one request of ``seq``; again, with neither START nor END (as Triton's
        iterative sequencer does), each time the model releases it with RESCHEDULE."""
        own = len(request.inputs)
        while True:
            request.flags = (FLAG_START if start else 0) | (FLAG_END if end else 0)
            del request.inputs[own:]
            request.inputs.extend(controls)
            if self.states:
                if start:
                    seq.state = dict(self.initial)
                request.inputs.extend(seq.state.values())
            try:
                result = await self._execute(seq.worker, request, seq.slot)
            except WorkerDied:
                self._release(seq, "ended: its instance failed")
                raise
            seq.last_ns = time.monotonic_ns()
            if self.states and isinstance(result, InferResult):
                self._keep_state(seq, result)
            if not isinstance(result, InferResult) or not result.rescheduled:
                return result
            result.done()  # this execution answered nothing: the request runs again
            start = end = False
            controls = self.controls.tensors(seq.corrid, False, False, request_id=request.id)

    def _keep_state(self, seq: Sequence, result: InferResult) -> None:
        """Take the state outputs out of ``result`` (copied: their bytes may be a worker's
        shared memory) and keep them as the next request's state inputs."""
        by_output = {s.output_name: s.input_name for s in self.states}
        kept = []
        for t in result.outputs:
            name = by_output.get(t.name)
            if name is None:
                kept.append(t)
            else:
                seq.state[name] = InputTensor(name, t.datatype, t.shape, bytes(t.data))
        result.outputs = kept

    async def _execute(self, worker: Worker, request: InferRequest, slot: int) -> InferResult | ServingError:
        """Queue ``request`` for ``worker``; requests queued meanwhile by other sequences on
        it run in the same batch."""
        q = self._queues.setdefault(id(worker), _InstanceQueue())
        fut: asyncio.Future[InferResult | ServingError] = asyncio.get_running_loop().create_future()
        if not q.pending:
            q.first_ns = time.monotonic_ns()
        q.pending.append((request, fut, slot))
        q.arrived.set()
        if not q.running:
            q.running = True
            task = asyncio.ensure_future(self._run_queue(worker, q))
            self._runners.add(task)  # the loop holds only weak references to tasks
            task.add_done_callback(self._runners.discard)
        try:
            return await fut
        finally:
            del fut

    async def _run_queue(self, worker: Worker, q: _InstanceQueue) -> None:
        try:
            while q.pending:
                await self._gather(q)
                # leftovers keep the oldest arrival: none waits longer than the delay
                batch, q.pending = q.pending[: self.max_batch], q.pending[self.max_batch :]
                rows = self._rows(batch)
                try:
                    results = await self.pool.run([r for r, _ in rows], worker=worker)
                except Exception as exc:  # noqa: BLE001 - every waiter gets the batch's error
                    err = exc if isinstance(exc, ServingError) else ServingError(f"batch failed: {exc!r}")
                    err = err.with_traceback(None)  # shared by every waiter: holds no frame
                    for _, fut in rows:
                        if fut is not None and not fut.done():
                            fut.set_exception(err)
                    continue
                for (_, fut), res in zip(rows, results, strict=True):
                    if fut is None or fut.done():  # a null row, or its client went away
                        if isinstance(res, InferResult):
                            res.done()
                    else:
                        fut.set_result(res)
        finally:
            q.running = False

    def _rows(
        self, batch: list[_Pending]
    ) -> list[tuple[InferRequest, asyncio.Future[InferResult | ServingError] | None]]:
        """The batch in execution order: arrival order, or (direct strategy) by slot with a
        null request in each row below the highest slot whose sequence sent nothing."""
        if not self.pinned:
            return [(r, fut) for r, fut, _ in batch]
        by_slot = {slot: (r, fut) for r, fut, slot in batch}
        template = batch[0][0]
        rows: list[tuple[InferRequest, asyncio.Future[InferResult | ServingError] | None]] = []
        for slot in range(max(by_slot) + 1):
            rows.append(by_slot.get(slot) or (self._null_request(template), None))
        return rows

    def _null_request(self, template: InferRequest) -> InferRequest:
        """A request for an empty slot: the template's model inputs as zeros, controls false."""
        skip = self.controls.names | {s.input_name for s in self.states}
        inputs = [zeros_like(t) for t in template.inputs if t.name not in skip]
        inputs += self.controls.tensors(0, False, False, ready=False)
        inputs += [self.initial[s.input_name] for s in self.states]
        return InferRequest(
            model_name=template.model_name, model_version=template.model_version, inputs=inputs, null=True
        )

    async def _gather(self, q: _InstanceQueue) -> None:
        """Wait (at most the queue delay from the oldest arrival) for ``target`` requests."""
        while len(q.pending) < self.target:
            left = q.first_ns + self.delay_ns - time.monotonic_ns()
            if left <= 0:
                return
            q.arrived.clear()
            try:
                await asyncio.wait_for(q.arrived.wait(), left / 1e9)
            except TimeoutError:
                return

    async def _reap_idle(self) -> None:
        interval = max(0.01, self.idle_ns / 2e9)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic_ns()
            for seq in list(self._active.values()):
                if not seq.lock.locked() and now - seq.last_ns > self.idle_ns:
                    log.info("model '%s': sequence %r idle, released", self.name, seq.corrid)
                    self._release(seq, "was released after being idle longer than max_sequence_idle_microseconds")

    async def drain(self, timeout_s: float) -> None:
        await super().drain(timeout_s)
        if self._reaper is not None:
            self._reaper.cancel()
