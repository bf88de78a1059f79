"""``InstancePool``: batches encoded to a worker and its reply decoded, against scripted workers."""

from __future__ import annotations

import asyncio

import pytest

from shoal.proto.errors import BackendError, ErrorCode, ModelNotReady, ServingError
from shoal.server.types import InferResult
from tests.component.dispatch.harness import INLINE_MAX, Harness, answered_by, eventually, out_bytes, request

pytestmark = pytest.mark.timeout(30)

LABEL = "model 'm' version 1 instance 'm_0'"
BIG = b"B" * (INLINE_MAX + 1)
"""An input that goes through the router's input arena."""


async def test_batch_answered_in_order(harness: Harness) -> None:
    fake = await harness.started()
    pool = harness.pool(fake)
    batch = [request(b"a", b"bc", rid="r0"), request(b"d" * INLINE_MAX, rid="r1"), request(BIG, b"e", rid="r2")]
    results = await pool.run(batch)
    assert [out_bytes(r) for r in results] == [b"abc", b"d" * INLINE_MAX, BIG + b"e"]
    for i, r in enumerate(results):
        assert isinstance(r, InferResult)
        assert (r.model_name, r.model_version, r.id) == ("m", 1, f"r{i}")
        assert r.parameters["index"] == i and answered_by(r) == fake.worker.pid
        assert r.release is None  # nothing in shared memory to give back
    infer = fake.events("infer")[0]
    assert infer["request_ids"] == ["r0", "r1", "r2"]
    # up to inline_max_bytes inline as frames, larger through the router's arena
    assert infer["sources"] == [["frame", "frame"], ["frame"], ["shm", "frame"]]
    assert all(req.instance == "m_0" for req in batch)
    assert harness.arena.stats().live_blocks == 0
    assert fake.worker.outstanding == 0


async def test_least_busy_ready_worker_is_picked(harness: Harness) -> None:
    gates = [harness.gate(), harness.gate()]
    f0 = await harness.started({"infer": [{"hold": gates[0]}]})
    f1 = await harness.started({"infer": [{"hold": gates[1]}]})
    w0, w1 = f0.worker, f1.worker
    pool = harness.pool(f0, f1)
    assert pool.ready_count == 2
    assert pool.pick() is w0  # a tie goes to the first
    first = asyncio.ensure_future(pool.run([request(b"first")]))
    await f0.event("infer")
    assert (w0.outstanding, w1.outstanding) == (1, 0)
    assert pool.pick() is w1
    second = asyncio.ensure_future(pool.run([request(b"second")]))
    await f1.event("infer")
    assert (w0.outstanding, w1.outstanding) == (1, 1)
    third = asyncio.ensure_future(pool.run([request(b"third")]))  # a tie again: the first
    await eventually(lambda: w0.outstanding == 2, "the third batch to be sent")
    assert w1.outstanding == 1
    assert pool.pick() is w1
    harness.open_gate(gates[1])
    assert answered_by((await second)[0]) == w1.pid
    assert pool.pick() is w1
    harness.open_gate(gates[0])
    assert answered_by((await first)[0]) == w0.pid
    assert answered_by((await third)[0]) == w0.pid
    assert (w0.outstanding, w1.outstanding) == (0, 0)


async def test_pick_skips_workers_that_are_not_ready(harness: Harness) -> None:
    f0 = await harness.started()
    f1 = await harness.started()
    pool = harness.pool(f0, f1)
    await f0.worker.stop()
    assert pool.ready_count == 1
    assert pool.pick() is f1.worker
    assert answered_by((await pool.run([request(b"x")]))[0]) == f1.worker.pid
    with pytest.raises(ModelNotReady):
        await pool.run([request(b"x")], worker=f0.worker)
    assert f0.events("infer") == []
    await f1.worker.stop()
    with pytest.raises(ModelNotReady) as info:
        await pool.run([request(b"x")])
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert len(f1.events("infer")) == 1
    assert harness.arena.stats().live_blocks == 0


async def test_outputs_in_worker_shm_are_read_then_released(harness: Harness) -> None:
    fake = await harness.started({"infer_default": {"outputs": "shm"}})
    pool = harness.pool(fake)
    results = await pool.run([request(b"one"), request(BIG), request(b"three")])
    produced = fake.events("outputs")[0]
    assert produced["live"] == 3
    for r, want in zip(results, [b"one", BIG, b"three"], strict=True):
        assert isinstance(r, InferResult)
        out = r.outputs[0]
        assert out.arena is not None and out.arena.region.startswith(fake.worker.arena_prefix)
        assert isinstance(out.data, memoryview) and bytes(out.data) == want
        assert r.release is not None
    await asyncio.sleep(0.05)
    assert fake.events("release") == []  # nothing is given back before the frontend is done
    for r in results:
        assert isinstance(r, InferResult)
        r.outputs[0].data = b""
        r.done()
        r.done()  # idempotent
    await fake.event("release", count=3)
    released = fake.events("release")
    assert sorted(b for e in released for b in e["blocks"]) == sorted(produced["blocks"])
    assert released[-1]["live"] == 0
    await asyncio.sleep(0.05)
    assert len(fake.events("release")) == 3


async def test_outputs_of_an_abandoned_batch_are_released(harness: Harness) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer_default": {"outputs": "shm", "hold": gate}})
    task = asyncio.ensure_future(harness.pool(fake).run([request(BIG), request(b"small")]))
    await fake.event("infer")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    harness.open_gate(gate)
    release = await fake.event("release")
    assert len(release["blocks"]) == 2 and release["live"] == 0
    await eventually(lambda: harness.arena.stats().live_blocks == 0, "the input block to be freed")
    assert fake.worker.outstanding == 0


async def test_input_blocks_freed_only_once_the_worker_answered_a_cancelled_batch(harness: Harness) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer_default": {"hold": gate}})
    task = asyncio.ensure_future(harness.pool(fake).run([request(BIG), request(BIG, BIG)]))
    await fake.event("infer")
    assert harness.arena.stats().live_blocks == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    # the worker may still be reading them
    assert harness.arena.stats().live_blocks == 3
    assert fake.worker.outstanding == 1
    harness.open_gate(gate)
    await fake.event("answered")
    await eventually(lambda: harness.arena.stats().live_blocks == 0, "the input blocks to be freed")
    assert fake.worker.outstanding == 0
    # and the worker serves on
    assert out_bytes((await harness.pool(fake).run([request(BIG)]))[0]) == BIG


async def test_per_request_errors(harness: Harness) -> None:
    errors = {"1": ["INVALID_ARGUMENT", "input 'IN0' must be positive"], "2": ["INTERNAL", "CUDA error"]}
    fake = await harness.started({"infer_default": {"errors": errors}})
    results = await harness.pool(fake).run([request(b"a"), request(BIG), request(b"c"), request(b"d")])
    assert out_bytes(results[0]) == b"a" and out_bytes(results[3]) == b"d"
    e1, e2 = results[1], results[2]
    assert isinstance(e1, BackendError) and isinstance(e2, BackendError)
    assert (e1.code, e1.message) == (ErrorCode.INVALID_ARGUMENT, "input 'IN0' must be positive")
    assert (e2.code, e2.message) == (ErrorCode.INTERNAL, "CUDA error")
    assert harness.arena.stats().live_blocks == 0


async def test_whole_batch_failure_raises(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"failed": ["RESOURCE_EXHAUSTED", "out of memory"]}]})
    pool = harness.pool(fake)
    with pytest.raises(BackendError) as info:
        await pool.run([request(BIG), request(b"b")])
    assert (info.value.code, info.value.message) == (ErrorCode.RESOURCE_EXHAUSTED, "out of memory")
    assert harness.arena.stats().live_blocks == 0
    assert out_bytes((await pool.run([request(b"ok")]))[0]) == b"ok"


@pytest.mark.parametrize("delta", [-1, 1])
async def test_wrong_number_of_results_is_an_internal_error(harness: Harness, delta: int) -> None:
    fake = await harness.started({"infer": [{"results_delta": delta}]})
    pool = harness.pool(fake)
    with pytest.raises(ServingError) as info:
        await pool.run([request(BIG), request(b"b")])
    assert info.value.message == f"{LABEL}: malformed reply"
    assert info.value.code is ErrorCode.INTERNAL
    assert harness.arena.stats().live_blocks == 0 and fake.worker.outstanding == 0
    assert fake.worker.ready
    assert out_bytes((await pool.run([request(b"ok")]))[0]) == b"ok"


async def test_garbage_from_a_worker_is_dropped(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"garbage_first": True}]})
    results = await harness.pool(fake).run([request(b"still fine")])
    assert out_bytes(results[0]) == b"still fine"


async def test_shm_output_outside_its_segment_fails_that_request(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"outputs": "shm", "bad_block": True}]})
    results = await harness.pool(fake).run([request(b"x")])
    assert isinstance(results[0], ServingError)
    assert results[0].code is ErrorCode.INVALID_ARGUMENT
    assert "outside region" in results[0].message
    release = await fake.event("release", timeout=0.5)  # the block goes back all the same
    assert release["live"] == 0


async def test_reply_naming_a_missing_frame_is_an_internal_error(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"outputs": ["shm", "inline"], "bad_frame": True}]})
    results = await harness.pool(fake).run([request(b"in shm"), request(b"bad frame")])
    assert isinstance(results[1], ServingError) and results[1].code is ErrorCode.INTERNAL
    assert "names a missing frame" in results[1].message
    assert isinstance(results[0], InferResult)
    results[0].done()
    release = await fake.event("release", timeout=0.5)
    assert release["live"] == 0


async def test_malformed_reply_gives_its_output_blocks_back(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"outputs": "shm", "results_delta": -1}]})
    with pytest.raises(ServingError, match="malformed reply"):
        await harness.pool(fake).run([request(b"a"), request(b"b"), request(b"c")])
    release = await fake.event("release", timeout=0.5)
    assert release["live"] == 0


async def test_forget_reaches_a_ready_worker_only(harness: Harness) -> None:
    fake = await harness.started()
    fake.worker.forget(region_ids=[3, 4], arena_prefixes=["shoal_1_ab_w9_g1"])
    forget = await fake.event("forget")
    assert (forget["region_ids"], forget["prefixes"]) == ([3, 4], ["shoal_1_ab_w9_g1"])
    await fake.worker.stop()
    fake.worker.forget(region_ids=[5])  # stopped: nothing to tell, and no error
    assert len(fake.events("forget")) == 1
