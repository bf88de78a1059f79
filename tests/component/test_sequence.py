"""``SequenceBatcher`` in process, on a fake pool. Its constructor takes no clock: it reads
``time.monotonic_ns`` and sleeps with ``asyncio.sleep``, so the tests of the idle release
and of the oldest strategy's queue delay use real, millisecond-sized times (every other
test lets no time pass: the default idle limit of 1 s is never reached)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.proto.errors import ErrorCode, ServingError, WorkerDied
from shoal.server.scheduling.sequence import SequenceBatcher
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult, InputTensor, OutputTensor
from tests.component.fakes import FakePool, Harness, config, error_of, request, result_of, settle, tensor, values

MODEL = """
name: "acc"
max_batch_size: {max_batch}
input [ {{ name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
sequence_batching {{
  {sb}
  control_input [
    {{ name: "START", control [ {{ kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END", control [ {{ kind: CONTROL_SEQUENCE_END, fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY", control [ {{ kind: CONTROL_SEQUENCE_READY, bool_false_true: [ false, true ] }} ] }},
    {{ name: "CORRID", control [ {{ kind: CONTROL_SEQUENCE_CORRID, data_type: {corrid} }} ] }}
  ]
  {state}
}}
"""

STATE = """state [ {
  input_name: "SUM_IN" output_name: "SUM_OUT" data_type: TYPE_INT32 dims: [ 1 ]
  initial_state: { data_type: TYPE_INT32, dims: [ 1 ], %s, name: "init" }
} ]"""

START_FLAG = (
    "inference request for sequence 1 to model 'acc' must specify the START flag on the first request of the sequence"
)


@dataclass
class Setup:
    batcher: SequenceBatcher
    pool: FakePool
    stats: ModelStats
    batching: bool

    def send(
        self, h: Harness, rid: str, corrid: Any, value: int = 1, *, start: bool = False, end: bool = False
    ) -> asyncio.Task[InferResult]:
        shape = (1, 1) if self.batching else (1,)
        params = {"sequence_id": corrid, "sequence_start": start, "sequence_end": end}
        return h.spawn(self.batcher.submit(request(rid, [tensor("INPUT", [value], shape)], params=params)))

    async def run(self, h: Harness, rid: str, corrid: Any, value: int = 1, **flags: bool) -> InferResult:
        """Send one request and let it finish (the pool must not hold it)."""
        task = self.send(h, rid, corrid, value, **flags)
        await settle()
        return result_of(task)


def make(
    h: Harness,
    sb: str = "",
    *,
    max_batch: int = 2,
    instances: int = 1,
    corrid: str = "TYPE_UINT64",
    state: str = "",
    model_dir: Path | None = None,
) -> Setup:
    pool = h.pool(instances)
    stats = ModelStats("acc", 1)
    cfg = config(MODEL.format(max_batch=max_batch, sb=sb, corrid=corrid, state=state))
    batcher = h.own(SequenceBatcher(pool.as_pool(), cfg, stats, model_dir))
    return Setup(batcher, pool, stats, max_batch > 0)


def inp(req: InferRequest, name: str) -> InputTensor:
    (t,) = [t for t in req.inputs if t.name == name]
    return t


def controls(req: InferRequest) -> dict[str, list[Any]]:
    return {n: values(inp(req, n)) for n in ("START", "END", "READY", "CORRID")}


async def wait_until(cond: Any, limit_s: float = 1.0) -> None:
    """Poll ``cond`` every millisecond (for the tests that need real time to pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


# ---- requests and control tensors -------------------------------------------------------------


async def test_control_tensors_and_flags_of_a_sequence(h: Harness) -> None:
    s = make(h)
    for rid, flags in (("r1", {"start": True}), ("r2", {}), ("r3", {"end": True})):
        assert (await s.run(h, rid, 7, **flags)).id == rid
    first, middle, last = (c.batch[0] for c in s.pool.calls)
    assert [t.name for t in first.inputs] == ["INPUT", "START", "END", "READY", "CORRID"]
    assert [(t.datatype, t.shape) for t in first.inputs[1:]] == [
        ("INT32", (1, 1)),
        ("FP32", (1, 1)),
        ("BOOL", (1, 1)),
        ("UINT64", (1, 1)),
    ]
    assert controls(first) == {"START": [1], "END": [0.0], "READY": [True], "CORRID": [7]}
    assert controls(middle) == {"START": [0], "END": [0.0], "READY": [True], "CORRID": [7]}
    assert controls(last) == {"START": [0], "END": [1.0], "READY": [True], "CORRID": [7]}
    assert [(r.correlation_id, r.flags) for r in (first, middle, last)] == [(7, 1), (7, 0), (7, 2)]
    assert s.stats.durations["success"].count == 3


async def test_non_batching_model_gets_controls_of_shape_1(h: Harness) -> None:
    s = make(h, max_batch=0)
    await s.run(h, "r1", 3, start=True, end=True)
    (req,) = s.pool.calls[0].batch
    assert {t.shape for t in req.inputs} == {(1,)}
    assert controls(req)["START"] == [1] and controls(req)["END"] == [1.0]


async def test_string_and_integer_ids_with_a_string_corrid(h: Harness) -> None:
    s = make(h, corrid="TYPE_STRING")
    await s.run(h, "r1", "abc", start=True)
    await s.run(h, "r2", 42, start=True)
    await s.run(h, "r3", "abc", end=True)
    by_id = {r.id: r for c in s.pool.calls for r in c.batch if not r.null}
    assert inp(by_id["r1"], "CORRID").datatype == "BYTES"
    assert controls(by_id["r1"])["CORRID"] == [b"abc"] and by_id["r1"].correlation_id == "abc"
    assert controls(by_id["r2"])["CORRID"] == [b"42"] and by_id["r2"].correlation_id == 42
    assert controls(by_id["r3"])["CORRID"] == [b"abc"] and by_id["r3"].flags == 2


@pytest.mark.parametrize("data_type", ["TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32"])
async def test_integer_corrid_forms(h: Harness, data_type: str) -> None:
    s = make(h, corrid=data_type)
    await s.run(h, "r", 123, start=True)
    corrid = inp(s.pool.calls[0].batch[0], "CORRID")
    assert corrid.datatype == data_type.removeprefix("TYPE_") and values(corrid) == [123]


async def test_string_id_is_refused_by_an_integer_corrid(h: Harness) -> None:
    s = make(h)
    task = s.send(h, "r1", "abc", start=True)
    await settle()
    err = error_of(task)
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert err.message == (
        "[request id: r1] sequence batching control 'CORRID' data-type is 'BYTES', but model 'acc' expects 'UINT64'"
    )
    assert s.pool.calls == []


@pytest.mark.parametrize(
    ("params", "batch", "text"),
    [
        ({}, 1, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": 0}, 1, "non-zero"),
        ({"sequence_id": ""}, 1, "non-empty"),
        ({"sequence_id": -3}, 1, "unsigned integer or a string"),
        ({"sequence_id": True}, 1, "unsigned integer or a string"),
        ({"sequence_id": 1.5}, 1, "unsigned integer or a string"),
        ({"sequence_id": 5, "sequence_start": "yes"}, 1, "'sequence_start' must be a boolean"),
        (
            {"sequence_id": 5, "sequence_start": True},
            2,
            "inference request to model 'acc' must specify batch-size 1 due to requirements of sequence batcher",
        ),
        (
            {"sequence_id": 5},
            1,
            "inference request for sequence 5 to model 'acc' must specify the START flag on the first request of "
            "the sequence",
        ),
    ],
)
async def test_bad_sequence_requests_are_refused(h: Harness, params: dict[str, Any], batch: int, text: str) -> None:
    s = make(h)
    req = request("r", [tensor("INPUT", [1] * batch, (batch, 1))], params=params)
    with pytest.raises(ServingError) as ei:
        await s.batcher.submit(req)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT and text in ei.value.message
    assert s.pool.calls == [] and s.batcher.inflight == 0


async def test_an_ended_sequence_must_start_again(h: Harness) -> None:
    s = make(h)
    await s.run(h, "r1", 9, start=True, end=True)
    task = s.send(h, "r2", 9)
    await settle()
    assert "must specify the START flag" in error_of(task).message
    await s.run(h, "r3", 9, start=True)


# ---- slots -------------------------------------------------------------------------------------


async def test_sequences_spread_over_instances_and_keep_their_instance_and_slot(h: Harness) -> None:
    s = make(h, instances=2)
    for corrid in (1, 2, 3):  # the instance with the most free slots; ties: the first
        await s.run(h, f"start{corrid}", corrid, start=True)
    workers = [c.worker.spec.instance_name for c in s.pool.calls]
    assert workers == ["instance0", "instance1", "instance0"]
    for corrid in (3, 2, 1):
        await s.run(h, f"next{corrid}", corrid)
    calls = s.pool.calls[3:]
    assert [c.worker.spec.instance_name for c in calls] == ["instance0", "instance1", "instance0"]
    # sequence 3 holds slot 1 of instance0: its request is the batch's second row
    assert [r.null for r in calls[0].batch] == [True, False] and calls[0].batch[1].id == "next3"
    assert [r.null for r in calls[2].batch] == [False]


async def test_a_start_waits_for_a_free_slot(h: Harness) -> None:
    s = make(h, max_batch=2)
    await s.run(h, "a", 1, start=True)
    await s.run(h, "b", 2, start=True)
    waiting = s.send(h, "c", 3, start=True)
    await settle()
    assert not waiting.done() and s.batcher.pending == 1
    assert len(s.pool.calls) == 2
    await s.run(h, "a-end", 1, end=True)
    await settle()
    assert result_of(waiting).id == "c" and s.batcher.pending == 0
    assert [r.id for r in s.pool.calls[-1].batch] == ["c"]  # slot 0, which A gave back


async def test_a_new_start_of_a_live_id_restarts_the_sequence(h: Harness) -> None:
    s = make(h, max_batch=1)
    await s.run(h, "a1", 1, start=True, value=1)
    await s.run(h, "a2", 1, start=True, value=2)  # one slot: it must reuse A's own
    await s.run(h, "a3", 1, end=True)
    await s.run(h, "b", 2, start=True)


async def test_an_idle_sequence_is_released_and_its_slot_reused(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shoal.sequence")
    s = make(h, "max_sequence_idle_microseconds: 1000", max_batch=1)
    await s.run(h, "a", 1, start=True)
    s.pool.hold = True
    waiting = s.send(h, "b", 2, start=True)
    await wait_until(lambda: bool(s.pool.open_calls))  # A idle > 1 ms: released, B started
    # B's request executes for longer than the idle limit: a busy sequence is not released
    await asyncio.sleep(0.025)
    s.pool.open_calls[0].finish()
    await settle()
    assert result_of(waiting).id == "b"
    s.pool.hold = False
    await s.run(h, "b2", 2)
    late = s.send(h, "a2", 1)
    await settle()
    err = error_of(late)
    # Triton's text to the client (as Triton, which forgets an expired sequence); the log says why
    assert (err.code, err.message) == (ErrorCode.INVALID_ARGUMENT, START_FLAG)
    assert "released after being idle longer than max_sequence_idle_microseconds" in caplog.text


# ---- batches -----------------------------------------------------------------------------------


async def test_direct_strategy_puts_each_sequence_in_its_row_with_null_requests(h: Harness) -> None:
    s = make(h, max_batch=4)
    for corrid in (1, 2, 3):  # slots 0, 1, 2
        await s.run(h, f"s{corrid}", corrid, start=True, value=corrid)
    third = s.pool.calls[2].batch
    assert [r.null for r in third] == [True, True, False] and third[2].id == "s3"
    null = third[0]
    assert null.id == "" and null.correlation_id == 0 and null.flags == 0
    assert controls(null) == {"START": [0], "END": [0.0], "READY": [False], "CORRID": [0]}
    assert inp(null, "INPUT").shape == (1, 1) and values(inp(null, "INPUT")) == [0]
    assert s.pool.released == 3  # the null rows' results (1 + 2); the real ones are the caller's

    s.pool.hold = True
    first = s.send(h, "n1", 1)
    await settle()
    later = [s.send(h, "n3", 3), s.send(h, "n2", 2)]
    await settle()
    s.pool.open_calls[0].finish()
    await settle()
    rows = s.pool.calls[-1].batch
    assert [(r.null, r.id) for r in rows] == [(True, ""), (False, "n2"), (False, "n3")]
    s.pool.open_calls[0].finish()
    await settle()
    assert [result_of(t).id for t in (first, *later)] == ["n1", "n3", "n2"]


OLDEST = "oldest {{ max_candidate_sequences: {n} {more} }}"


async def test_oldest_strategy_batches_sequences_in_arrival_order(h: Harness) -> None:
    s = make(h, OLDEST.format(n=4, more=""), max_batch=4)
    for corrid in (1, 2, 3, 4):
        await s.run(h, f"s{corrid}", corrid, start=True)
    assert all(len(c.batch) == 1 for c in s.pool.calls)  # no null rows
    s.pool.hold = True
    s.send(h, "d", 4)
    await settle()
    s.send(h, "c", 3)
    s.send(h, "a", 1)
    await settle()
    s.pool.open_calls[0].finish()
    await settle()
    assert [r.id for r in s.pool.calls[-1].batch] == ["c", "a"]


async def test_oldest_strategy_slots_are_the_candidate_sequences(h: Harness) -> None:
    s = make(h, OLDEST.format(n=3, more=""), max_batch=2)
    for corrid in (1, 2, 3):
        await s.run(h, f"s{corrid}", corrid, start=True)
    fourth = s.send(h, "s4", 4, start=True)
    await settle()
    assert not fourth.done() and s.batcher.pending == 1
    await s.run(h, "end2", 2, end=True)
    await settle()
    assert result_of(fourth).id == "s4"


async def test_oldest_strategy_waits_for_the_preferred_batch_size(h: Harness) -> None:
    s = make(h, OLDEST.format(n=4, more="preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 5000000"))
    starts = [s.send(h, "s1", 1, start=True), s.send(h, "s2", 2, start=True)]
    await settle()
    assert [r.id for r in s.pool.calls[0].batch] == ["s1", "s2"] and all(t.done() for t in starts)
    one = s.send(h, "one", 1)
    await settle()
    assert len(s.pool.calls) == 1 and not one.done()  # waits (up to 5 s) for a second sequence
    two = s.send(h, "two", 2)
    await settle()
    assert [r.id for r in s.pool.calls[1].batch] == ["one", "two"]
    assert result_of(one).id == "one" and result_of(two).id == "two"


async def test_oldest_strategy_sends_what_it_has_after_the_queue_delay(h: Harness) -> None:
    s = make(h, OLDEST.format(n=4, more="preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 2000"))
    alone = s.send(h, "alone", 1, start=True)
    await settle()
    assert s.pool.calls == []
    await wait_until(alone.done)  # 2 ms
    assert [r.id for r in s.pool.calls[0].batch] == ["alone"]


# ---- implicit state ----------------------------------------------------------------------------


def accumulate(req: InferRequest) -> InferResult:
    """A stateless model: SUM_OUT = OUTPUT = SUM_IN + INPUT."""
    total = values(inp(req, "INPUT"))[0] + values(inp(req, "SUM_IN"))[0]
    data = np.array([[total]], np.int32).tobytes()
    outs = [OutputTensor("OUTPUT", "INT32", (1, 1), data), OutputTensor("SUM_OUT", "INT32", (1, 1), data)]
    return InferResult(req.model_name, req.model_version, outs, id=req.id)


async def test_implicit_state_is_fed_back_and_reset_on_start(h: Harness) -> None:
    s = make(h, state=STATE % "zero_data: true")
    s.pool.respond = accumulate
    sums = []
    for rid, corrid, value, start in (("a1", 1, 3, True), ("b1", 2, 100, True), ("a2", 1, 4, False)):
        result = await s.run(h, rid, corrid, value, start=start)
        assert [t.name for t in result.outputs] == ["OUTPUT"]  # the state is not returned
        sums.append(values(result.outputs[0])[0])
    again = await s.run(h, "a3", 1, 10, start=True)
    sums.append(values(again.outputs[0])[0])
    assert sums == [3, 100, 7, 10]
    first = s.pool.calls[0].batch[0]
    assert inp(first, "SUM_IN").shape == (1, 1) and values(inp(first, "SUM_IN")) == [0]


async def test_implicit_state_adds_its_output_to_the_requested_ones(h: Harness) -> None:
    s = make(h, state=STATE % "zero_data: true")
    s.pool.respond = accumulate
    params = {"sequence_id": 5, "sequence_start": True}
    task = h.spawn(s.batcher.submit(request("r", [tensor("INPUT", [2], (1, 1))], params=params, outputs=["OUTPUT"])))
    await settle()
    assert values(result_of(task).outputs[0]) == [2]
    outputs = s.pool.calls[0].batch[0].outputs
    assert outputs is not None and [o.name for o in outputs] == ["OUTPUT", "SUM_OUT"]


async def test_initial_state_from_a_data_file(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "five").write_bytes(np.array([5], np.int32).tobytes())
    s = make(h, state=STATE % 'data_file: "five"', model_dir=tmp_path)
    s.pool.respond = accumulate
    result = await s.run(h, "r", 1, 2, start=True)
    assert values(result.outputs[0]) == [7]


# ---- failures ----------------------------------------------------------------------------------


async def test_instance_failing_during_a_request_ends_its_sequence(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.sequence")
    s = make(h, max_batch=1)  # one slot
    await s.run(h, "a1", 1, start=True)
    s.pool.fail_next.append(WorkerDied("instance0 died"))
    died = s.send(h, "a2", 1)
    await settle()
    assert isinstance(error_of(died), WorkerDied) and error_of(died).code is ErrorCode.UNAVAILABLE
    await s.run(h, "b", 2, start=True, end=True)  # A's slot was given back
    late = s.send(h, "a3", 1)
    await settle()
    assert error_of(late).message == START_FLAG
    assert "ended: its instance failed" in caplog.text
    await s.run(h, "a4", 1, start=True)


async def test_restarted_instance_ends_its_sequences_without_running_them(h: Harness) -> None:
    s = make(h, max_batch=1)
    await s.run(h, "a1", 1, start=True)
    s.pool.workers[0].generation += 1  # restarted: the model's state for A is gone
    task = s.send(h, "a2", 1)
    await settle()
    err = error_of(task)
    assert isinstance(err, WorkerDied) and "sequence 1 ended" in err.message
    assert len(s.pool.calls) == 1
    await s.run(h, "b", 2, start=True)  # the slot is free again


async def test_failed_batch_fails_every_sequence_in_it(h: Harness) -> None:
    s = make(h, OLDEST.format(n=4, more=""), max_batch=4)
    for corrid in (1, 2, 3):
        await s.run(h, f"s{corrid}", corrid, start=True)
    s.pool.hold = True
    s.send(h, "x1", 1)
    await settle()
    tasks = [s.send(h, "x2", 2), s.send(h, "x3", 3)]
    await settle()
    s.pool.open_calls[0].finish()
    await settle()
    s.pool.open_calls[0].fail(RuntimeError("boom"))
    await settle()
    for task in tasks:
        assert error_of(task).message == "batch failed: RuntimeError('boom')"
    s.pool.hold = False
    await s.run(h, "y2", 2)  # a failed execution does not end the sequences


async def test_no_ready_instance_refuses_a_start(h: Harness) -> None:
    s = make(h)
    s.pool.workers[0].ready = False
    task = s.send(h, "a", 1, start=True)
    await settle()
    assert error_of(task).code is ErrorCode.UNAVAILABLE and s.batcher.inflight == 0


async def test_drain_refuses_new_requests_and_stops_the_reaper(h: Harness) -> None:
    s = make(h)
    await s.run(h, "a", 1, start=True)
    await s.batcher.drain(0.0)
    await settle()
    task = s.send(h, "b", 1)
    await settle()
    assert error_of(task).code is ErrorCode.UNAVAILABLE
    assert s.batcher._reaper is not None and s.batcher._reaper.done()


# ---- bugs --------------------------------------------------------------------------------------


async def test_a_cancelled_start_passes_its_wake_up_on(h: Harness) -> None:
    s = make(h, max_batch=1)
    await s.run(h, "a", 1, start=True)
    b = s.send(h, "b", 2, start=True)
    c = s.send(h, "c", 3, start=True)
    await settle()
    assert s.batcher.pending == 2
    s.send(h, "a-end", 1, end=True)
    await _until_woken(s)  # A's END gave its slot to B, and B's client goes away before B runs
    assert not b.done()
    b.cancel()
    await settle()
    assert result_of(c).id == "c"


async def _until_woken(s: Setup) -> None:
    """Run the loop until a backlog waiter has been woken, and not one turn further."""
    for _ in range(50):
        if len(s.batcher._waiting) < 2:
            return
        await asyncio.sleep(0)
    raise AssertionError("no waiter was woken")


async def test_restart_of_a_live_id_during_its_end_frees_the_slot_once(h: Harness) -> None:
    s = make(h, max_batch=1)  # one slot
    await s.run(h, "a1", 1, start=True)
    s.pool.hold = True
    ending = s.send(h, "a-end", 1, end=True)
    await settle()
    restart = s.send(h, "a-again", 1, start=True)
    await settle()
    for _ in range(2):
        s.pool.open_calls[0].finish()
        await settle()
    assert result_of(ending).id == "a-end" and result_of(restart).id == "a-again"
    s.pool.hold = False
    other = s.send(h, "b", 2, start=True)  # A holds the only slot: B must wait
    await settle()
    assert not other.done() and s.batcher.pending == 1


async def test_a_failed_instance_frees_a_sequence_slot_once(h: Harness) -> None:
    s = make(h, max_batch=1)
    await s.run(h, "a1", 1, start=True)
    s.pool.hold = True
    first, second = s.send(h, "a2", 1), s.send(h, "a3", 1)
    await settle()
    s.pool.workers[0].generation += 1  # the instance died and came back
    s.pool.open_calls[0].fail(WorkerDied("instance0 died"))
    await settle()
    assert isinstance(error_of(first), WorkerDied) and isinstance(error_of(second), WorkerDied)
    s.pool.hold = False
    await s.run(h, "b", 2, start=True)
    other = s.send(h, "c", 3, start=True)  # B holds the only slot: C must wait
    await settle()
    assert not other.done()


async def test_a_refused_start_gives_its_slot_back(h: Harness) -> None:
    s = make(h, max_batch=1)
    refused = s.send(h, "bad", "abc", start=True)
    await settle()
    assert error_of(refused).code is ErrorCode.INVALID_ARGUMENT
    ok = s.send(h, "good", 5, start=True)
    await settle()
    assert result_of(ok).id == "good"
