"""``DynamicBatcher`` in process: a fake pool whose executions the test finishes, and a fake
clock for the queue delay and the queue timeouts. The queue policy itself (``BatchQueue``)
has its own unit tests; these check what the batcher does with it: when a batch goes (an
instance free), what it is built from, how answers come back, and what happens when a
request goes away, a batch fails or the model is unloaded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.scheduling.dynamic import DynamicBatcher
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult
from tests.component.fakes import (
    MS,
    FakeClock,
    FakePool,
    Harness,
    Order,
    config,
    error_of,
    request,
    result_of,
    settle,
    zeros,
)

MODEL = """
name: "b"
max_batch_size: {max_batch}
input [
  {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }},
  {{ name: "RAGGED", data_type: TYPE_FP32, dims: [ -1 ], allow_ragged_batch: true, optional: true }}
]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
dynamic_batching {{ {db} }}
"""


@dataclass
class Setup:
    batcher: DynamicBatcher
    pool: FakePool
    clock: FakeClock
    stats: ModelStats

    def submit(self, h: Harness, req: InferRequest) -> asyncio.Task[InferResult]:
        return h.spawn(self.batcher.submit(req))

    async def tick(self, ns: int) -> None:
        """Advance the clock and let the batcher look at it (its loop sleeps in real time
        until its next deadline; with the fake clock the test wakes it). Requests just
        submitted reach the queue first."""
        await settle()
        self.clock.advance(ns)
        self.batcher._wake.set()
        await settle()


def make(h: Harness, db: str = "", *, max_batch: int = 8, instances: int = 1, hold: bool = True) -> Setup:
    pool = h.pool(instances, hold=hold)
    clock = FakeClock()
    stats = ModelStats("b", 1)
    cfg = config(MODEL.format(max_batch=max_batch, db=db))
    batcher = h.own(DynamicBatcher(pool.as_pool(), cfg, stats, clock=clock))
    return Setup(batcher, pool, clock, stats)


async def busy(h: Harness, s: Setup, rid: str = "busy") -> asyncio.Task[InferResult]:
    """A request that takes the (single) instance and keeps it until the test finishes it."""
    task = s.submit(h, request(rid))
    await settle()
    assert s.pool.calls[-1].ids == [rid]
    return task


# ---- batch formation ------------------------------------------------------------------------


async def test_batch_forms_from_what_queued_while_the_instance_was_busy(h: Harness) -> None:
    s = make(h)
    a = await busy(h, s, "a")
    rest = [s.submit(h, request(n)) for n in "bcd"]
    await settle()
    assert len(s.pool.calls) == 1, "a second batch went while the only instance was busy"
    assert (s.batcher.pending, s.batcher.inflight) == (3, 4)
    s.pool.calls[0].finish()
    await settle()
    assert result_of(a).id == "a"
    assert [c.ids for c in s.pool.calls] == [["a"], ["b", "c", "d"]]
    assert s.batcher.pending == 0 and s.batcher.inflight == 3
    s.pool.calls[1].finish()
    await settle()
    assert [result_of(t).id for t in rest] == ["b", "c", "d"]  # each request gets its own answer
    assert s.batcher.inflight == 0


async def test_capacity_is_ready_instances_minus_executing(h: Harness) -> None:
    s = make(h, instances=3)
    s.pool.workers[2].ready = False
    tasks = []
    for n in "abc":
        tasks.append(s.submit(h, request(n)))
        await settle()
    assert [c.ids for c in s.pool.calls] == [["a"], ["b"]]  # two ready instances: two batches
    assert s.batcher.pending == 1
    s.pool.calls[1].finish()
    await settle()
    assert [c.ids for c in s.pool.calls] == [["a"], ["b"], ["c"]]
    s.pool.workers[2].ready = True  # a third instance comes up: a third batch may run
    tasks += [s.submit(h, request("d"))]
    await settle()
    assert [c.ids for c in s.pool.calls][-1] == ["d"] and len(s.pool.open_calls) == 3


async def test_max_batch_size_splits_the_queue(h: Harness) -> None:
    s = make(h, max_batch=2)
    await busy(h, s)
    for n in "abcde":
        s.submit(h, request(n))
    await settle()
    for _ in range(3):
        s.pool.open_calls[0].finish()
        await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["a", "b"], ["c", "d"], ["e"]]


async def test_preferred_size_goes_at_once_otherwise_the_delay_through_the_clock(h: Harness) -> None:
    s = make(h, "max_queue_delay_microseconds: 1000000 preferred_batch_size: [ 4 ]", hold=False)
    tasks = []
    for n in "abc":
        tasks.append(s.submit(h, request(n)))
        await settle()
    await s.tick(999 * MS)
    assert s.pool.calls == [], "a batch went before the queue delay or a preferred size"
    tasks.append(s.submit(h, request("d")))
    await settle()
    assert [c.ids for c in s.pool.calls] == [["a", "b", "c", "d"]]  # the preferred size: no wait
    tasks.append(s.submit(h, request("e")))
    await s.tick(1000 * MS - 1)
    assert len(s.pool.calls) == 1
    await s.tick(1)  # "e" has waited max_queue_delay
    assert [c.ids for c in s.pool.calls] == [["a", "b", "c", "d"], ["e"]]
    assert [result_of(t).id for t in tasks] == list("abcde")


async def test_without_delay_a_lone_request_goes_at_once(h: Harness) -> None:
    s = make(h, "preferred_batch_size: [ 4 ]", hold=False)
    task = s.submit(h, request("a"))
    await settle()
    assert result_of(task).id == "a"


# ---- priorities and queue policies ------------------------------------------------------------

PRIORITIES = "priority_levels: 2 default_priority_level: 2"


async def test_priority_levels_order_the_batches(h: Harness) -> None:
    s = make(h, PRIORITIES, max_batch=2)
    await busy(h, s)
    for rid, priority in (("lo1", 0), ("hi1", 1), ("lo2", 2), ("hi2", 1)):
        s.submit(h, request(rid, params={"priority": priority}))
    await settle()
    s.pool.calls[0].finish()
    await settle()
    s.pool.calls[1].finish()
    await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["hi1", "hi2"], ["lo1", "lo2"]]


@pytest.mark.parametrize("priority", [3, -1, "1", 1.0])
async def test_bad_priority_is_refused_at_submit(h: Harness, priority: object) -> None:
    s = make(h, PRIORITIES)
    task = s.submit(h, request("a", params={"priority": priority}))
    await settle()
    assert error_of(task).code is ErrorCode.INVALID_ARGUMENT
    assert s.pool.calls == [] and s.batcher.inflight == 0


async def test_reject_timeout_fails_only_the_late_request(h: Harness) -> None:
    s = make(h, "default_queue_policy { timeout_action: REJECT, default_timeout_microseconds: 1000 }")
    await busy(h, s)
    b = s.submit(h, request("b"))
    await s.tick(MS // 2)
    c = s.submit(h, request("c"))
    await s.tick(MS // 2)  # "b" has waited its 1 ms, "c" half of it
    err = error_of(b)
    assert (err.code, err.message) == (ErrorCode.UNAVAILABLE, "Request timeout expired")  # Triton's
    assert not c.done() and s.batcher.pending == 1
    s.pool.calls[0].finish()
    await settle()
    s.pool.calls[1].finish()
    await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["c"]]
    assert result_of(c).id == "c"
    assert s.stats.durations["fail"].count == 1 and s.stats.durations["success"].count == 2


async def test_request_timeout_overrides_the_default_when_allowed(h: Harness) -> None:
    s = make(
        h,
        "default_queue_policy { timeout_action: REJECT, default_timeout_microseconds: 1000,"
        " allow_timeout_override: true }",
    )
    await busy(h, s)
    longer = s.submit(h, request("longer", params={"timeout": 5000}))
    default = s.submit(h, request("default"))
    await s.tick(2 * MS)
    assert error_of(default).code is ErrorCode.UNAVAILABLE and not longer.done()
    await s.tick(3 * MS)
    assert error_of(longer).code is ErrorCode.UNAVAILABLE


async def test_delay_action_moves_late_requests_behind_and_runs_them(h: Harness) -> None:
    s = make(h, "default_queue_policy { timeout_action: DELAY, default_timeout_microseconds: 1000 }", max_batch=2)
    await busy(h, s)
    late = s.submit(h, request("late"))
    await s.tick(2 * MS)
    s.submit(h, request("b"))
    s.submit(h, request("c"))
    await s.tick(0)
    assert not late.done()
    for _ in range(2):
        s.pool.open_calls[0].finish()
        await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["b", "c"], ["late"]]
    s.pool.open_calls[0].finish()
    await settle()
    assert result_of(late).id == "late"


async def test_max_queue_size_refuses_at_admission(h: Harness) -> None:
    s = make(h, f"{PRIORITIES} priority_queue_policy {{ key: 1 value: {{ max_queue_size: 2 }} }}")
    await busy(h, s)  # executing: no longer queued
    high = [s.submit(h, request(f"h{i}", params={"priority": 1})) for i in range(2)]
    over = s.submit(h, request("over", params={"priority": 1}))
    low = s.submit(h, request("low"))  # level 2 has no limit
    await settle()
    err = error_of(over)
    assert (err.code, err.message) == (ErrorCode.UNAVAILABLE, "[request id: over] Exceeds maximum queue size")
    assert not any(t.done() for t in [*high, low])
    assert s.batcher.pending == 3 and s.batcher.inflight == 4
    assert s.stats.durations["fail"].count == 1


# ---- what can share a batch -------------------------------------------------------------------


async def test_requests_of_different_shapes_are_not_batched_together(h: Harness) -> None:
    s = make(h)
    await busy(h, s)
    for rid, shape in (("a", (1, 3)), ("b", (2, 3)), ("c", (1, 4))):
        s.submit(h, request(rid, shape=shape))
    await settle()
    for _ in range(2):
        s.pool.open_calls[0].finish()
        await settle()
    # "a" and "b" differ in the batch dimension only: one batch of 3 elements
    assert [c.ids for c in s.pool.calls] == [["busy"], ["a", "b"], ["c"]]


async def test_ragged_inputs_batch_together_whatever_their_shape(h: Harness) -> None:
    s = make(h)
    await busy(h, s)
    for rid, n in (("a", 2), ("b", 5), ("c", 1)):
        s.submit(h, request(rid, [zeros("INPUT0", (1, 3)), zeros("RAGGED", (1, n))]))
    await settle()
    s.pool.calls[0].finish()
    await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["a", "b", "c"]]


# ---- answers --------------------------------------------------------------------------------


async def _two_batches_answered_backwards(h: Harness, db: str) -> list[str]:
    s = make(h, db, instances=2)
    order = Order()
    tasks = []
    for n in "ab":
        tasks.append(order.watch(n, s.submit(h, request(n))))
        await settle()
    assert [c.ids for c in s.pool.calls] == [["a"], ["b"]]
    s.pool.calls[1].finish()
    await settle()
    if db:
        assert order.names == [], "a later batch was answered before an earlier one"
    s.pool.calls[0].finish()
    await settle()
    assert [result_of(t).id for t in tasks] == ["a", "b"]
    return order.names


async def test_preserve_ordering_answers_in_arrival_order(h: Harness) -> None:
    assert await _two_batches_answered_backwards(h, "preserve_ordering: true") == ["a", "b"]


async def test_without_preserve_ordering_a_later_batch_answers_first(h: Harness) -> None:
    assert await _two_batches_answered_backwards(h, "") == ["b", "a"]


async def test_per_request_error_fails_that_request_only(h: Harness) -> None:
    s = make(h, hold=False)
    s.pool.respond = lambda r: ServingError("bad row") if r.id == "bad" else InferResult("b", 1, [], id=r.id)
    good, bad = s.submit(h, request("good")), s.submit(h, request("bad"))
    await settle()
    assert [c.ids for c in s.pool.calls] == [["good", "bad"]]
    assert result_of(good).id == "good" and error_of(bad).message == "bad row"


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ServingError("instance died", code=ErrorCode.UNAVAILABLE), ErrorCode.UNAVAILABLE, "instance died"),
        (RuntimeError("bug"), ErrorCode.INTERNAL, "batch failed: RuntimeError('bug')"),
    ],
)
async def test_failed_batch_fails_every_request_and_the_batcher_goes_on(
    h: Harness, exc: BaseException, code: ErrorCode, text: str
) -> None:
    s = make(h)
    await busy(h, s)
    tasks = [s.submit(h, request(n)) for n in "abc"]
    await settle()
    s.pool.calls[0].finish()
    await settle()
    s.pool.calls[1].fail(exc)
    await settle()
    for task in tasks:
        err = error_of(task)
        assert err.code is code and err.message == text
    after = s.submit(h, request("after"))  # the instance counts as free again
    await settle()
    s.pool.calls[2].finish()
    await settle()
    assert result_of(after).id == "after"
    assert s.batcher.inflight == 0
    assert s.stats.durations["fail"].count == 3 and s.stats.durations["success"].count == 2


# ---- requests that go away --------------------------------------------------------------------


async def test_cancelled_queued_request_is_removed_and_never_runs(h: Harness) -> None:
    s = make(h)
    await busy(h, s)
    b, c = s.submit(h, request("b")), s.submit(h, request("c"))
    await settle()
    b.cancel()
    await settle()
    assert b.cancelled()
    assert s.batcher.pending == 1 and s.batcher.inflight == 2
    s.pool.calls[0].finish()
    await settle()
    assert [c.ids for c in s.pool.calls] == [["busy"], ["c"]]
    s.pool.calls[1].finish()
    await settle()
    assert result_of(c).id == "c" and s.batcher.inflight == 0


async def test_cancelled_executing_request_has_its_result_released(h: Harness) -> None:
    s = make(h)
    a = await busy(h, s, "a")
    b = s.submit(h, request("b"))
    await settle()
    s.pool.calls[0].finish()
    await settle()
    b.cancel()  # executing: the batch runs on, its result is given back
    await settle()
    s.pool.calls[1].finish()
    await settle()
    assert result_of(a).id == "a" and b.cancelled()
    assert (s.pool.made, s.pool.released) == (2, 1)  # "a"'s result is the caller's to release
    result_of(a).done()
    assert s.pool.released == 2


# ---- unloading ---------------------------------------------------------------------------------


async def test_drain_fails_queued_requests_and_refuses_new_ones(h: Harness) -> None:
    s = make(h)
    executing = await busy(h, s)
    queued = [s.submit(h, request(n)) for n in "bc"]
    await settle()
    await s.batcher.drain(0.0)
    await settle()
    for task in queued:
        err = error_of(task)
        assert err.code is ErrorCode.UNAVAILABLE
    with pytest.raises(ServingError) as ei:
        await s.batcher.submit(request("late"))
    assert ei.value.code is ErrorCode.UNAVAILABLE
    s.pool.calls[0].finish()  # what was executing still gets its answer
    await settle()
    assert result_of(executing).id == "busy"
    assert len(s.pool.calls) == 1 and s.batcher.inflight == 0


async def test_drain_waits_for_requests_in_flight(h: Harness) -> None:
    s = make(h)
    executing = await busy(h, s)
    queued = s.submit(h, request("q"))
    await settle()
    drain = h.spawn(s.batcher.drain(60.0))
    await settle()
    assert not drain.done()
    s.pool.calls[0].finish()
    await settle()
    s.pool.calls[1].finish()
    await settle()
    assert drain.done() and result_of(executing).id == "busy" and result_of(queued).id == "q"


# ---- statistics --------------------------------------------------------------------------------


async def test_statistics_use_the_clock_for_queue_and_total_time(h: Harness) -> None:
    s = make(h, "max_queue_delay_microseconds: 5000 default_queue_policy { max_queue_size: 1 }")
    a = s.submit(h, request("a"))
    await settle()
    refused = s.submit(h, request("refused"))
    await s.tick(5 * MS)  # the queue delay: "a" goes, having queued 5 ms
    assert [c.ids for c in s.pool.calls] == [["a"]]
    await s.tick(2 * MS)
    s.pool.calls[0].finish()
    await settle()
    assert result_of(a).id == "a" and error_of(refused).code is ErrorCode.UNAVAILABLE
    d = s.stats.durations
    assert (d["success"].count, d["success"].ns) == (1, 7 * MS)
    assert (d["queue"].count, d["queue"].ns) == (1, 5 * MS)
    assert (d["fail"].count, d["fail"].ns) == (1, 0)
    assert s.stats.last_inference_ms > 0
