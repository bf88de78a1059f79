"""``Worker`` supervision: a process that dies or hangs fails its batches and is replaced."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import pytest

from shoal.proto.errors import ErrorCode, WorkerDied
from shoal.server.dispatch.worker import WorkerState
from shoal.server.types import InferResult
from tests.component.dispatch.harness import INLINE_MAX, Fake, Harness, answered_by, eventually, out_bytes, request

pytestmark = pytest.mark.timeout(30)

LABEL = re.escape("model 'm' version 1 instance 'm_0'")
BIG = b"B" * (INLINE_MAX + 1)


async def ready_again(fake: Fake, generation: int, timeout: float = 5.0) -> None:
    w = fake.worker
    await eventually(lambda: w.ready and w.generation == generation, f"generation {generation} READY", timeout)


@pytest.mark.parametrize(
    ("action", "death"),
    [({"signal": "SIGKILL"}, "died: killed by signal SIGKILL"), ({"exit": 3}, "died: exited with status 3")],
    ids=["signal", "exit-status"],
)
async def test_death_mid_batch_fails_in_flight_batches_and_restarts(
    harness: Harness, action: dict[str, object], death: str
) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer": [{"outputs": "shm"}, {"hold": gate, **action}]}, {})
    w = fake.worker
    pool = harness.pool(fake)
    old_pid = w.pid
    (held,) = await pool.run([request(b"output kept in shm")])
    assert fake.segments(gen=1), "the first process made its output arena"
    dying = asyncio.ensure_future(pool.run([request(BIG), request(b"b")]))
    queued = asyncio.ensure_future(pool.run([request(BIG)]))  # behind it: never answered
    await eventually(lambda: w.outstanding == 2, "both batches to be sent")
    await fake.event("infer", count=2)
    harness.open_gate(gate)
    t_dead = time.monotonic()
    for task in (dying, queued):
        with pytest.raises(WorkerDied) as info:
            await asyncio.wait_for(task, 5.0)
        assert re.fullmatch(rf"{LABEL} \(pid {old_pid}\) {death}", info.value.message), info.value.message
        assert info.value.code is ErrorCode.UNAVAILABLE
    # inputs freed at once; the dead process's arena unlinked (below) though it never cleaned up
    assert harness.arena.stats().live_blocks == 0 and w.outstanding == 0
    assert not w.ready
    await ready_again(fake, 2)
    assert time.monotonic() - t_dead >= 0.1, "restarted without backoff"
    assert w.restarts == 1 and w.pid != old_pid
    assert fake.exits == [(1, f"{w.arena_prefix_base}_g1")]
    assert fake.segments(gen=1) == []
    assert isinstance(held, InferResult)
    held.done()  # its process is gone: nothing to send
    results = await asyncio.wait_for(pool.run([request(b"again")]), 5.0)
    assert out_bytes(results[0]) == b"again" and answered_by(results[0]) == w.pid
    assert fake.events("release") == []


async def test_crash_loop_backs_off_and_recovers(harness: Harness) -> None:
    fake = await harness.started({}, {"load": {"do": "exit", "status": 5}}, {}, restart_backoff_max_s=1.0)
    w = fake.worker
    t0 = time.monotonic()
    w.kill(signal.SIGKILL)
    await ready_again(fake, 3)
    # 0.1 s after the first death, 0.2 s after the failed reload
    assert time.monotonic() - t0 >= 0.3
    assert w.restarts == 2 and w.reason == ""
    assert [g for g, _ in fake.exits] == [1, 2]
    assert out_bytes((await asyncio.wait_for(harness.pool(fake).run([request(b"ok")]), 5.0))[0]) == b"ok"


async def test_silent_worker_is_killed_by_the_watchdog(harness: Harness) -> None:
    hang = {"infer": [{"stop_heartbeat": True, "hang": True}]}
    fake = await harness.started(hang, {}, heartbeat_timeout_s=0.5)
    w = fake.worker
    old_pid = w.pid
    t0 = time.monotonic()
    with pytest.raises(WorkerDied) as info:
        await asyncio.wait_for(harness.pool(fake).run([request(BIG)]), 5.0)
    assert time.monotonic() - t0 < 3.0
    pattern = rf"{LABEL} \(pid {old_pid}\) stopped answering \(no heartbeat for \d+ s\): killed and restarted"
    assert re.fullmatch(pattern, info.value.message), info.value.message
    assert harness.arena.stats().live_blocks == 0
    await ready_again(fake, 2)
    # a worker whose heartbeats come is left alone
    await asyncio.sleep(0.7)
    assert w.generation == 2 and w.ready
    assert answered_by((await asyncio.wait_for(harness.pool(fake).run([request(b"x")]), 5.0))[0]) == w.pid


async def test_worker_without_heartbeats_is_replaced_even_when_idle(harness: Harness) -> None:
    fake = await harness.started({"heartbeat": False}, {}, heartbeat_timeout_s=0.5)
    w = fake.worker
    assert fake.events("start")[0]["heartbeat_ms"] > 0
    await ready_again(fake, 2)
    assert w.restarts == 1 and fake.exits[0][0] == 1


async def test_stalled_batch_is_killed_by_the_watchdog(harness: Harness) -> None:
    fake = await harness.started({"infer": [{"hang": True}]}, {}, stall_timeout_s=0.5, heartbeat_timeout_s=0.0)
    w = fake.worker
    assert fake.events("start")[0]["heartbeat_ms"] == 0
    old_pid = w.pid
    t0 = time.monotonic()
    with pytest.raises(WorkerDied) as info:
        await asyncio.wait_for(harness.pool(fake).run([request(BIG)]), 5.0)
    assert time.monotonic() - t0 < 3.0
    pattern = rf"{LABEL} \(pid {old_pid}\) stopped answering \(a batch unanswered for \d+ s\): killed and restarted"
    assert re.fullmatch(pattern, info.value.message), info.value.message
    assert harness.arena.stats().live_blocks == 0
    await ready_again(fake, 2)


async def test_slow_batches_under_the_stall_timeout_are_left_alone(harness: Harness) -> None:
    fake = await harness.started({"infer_default": {"delay_s": 0.2}}, stall_timeout_s=0.5, heartbeat_timeout_s=0.0)
    pool = harness.pool(fake)
    assert out_bytes((await asyncio.wait_for(pool.run([request(b"slow")]), 5.0))[0]) == b"slow"
    await asyncio.sleep(0.6)  # idle: an answered batch no longer counts
    assert fake.worker.generation == 1 and fake.worker.restarts == 0


async def test_killed_while_idle_restarts(harness: Harness) -> None:
    fake = await harness.started()
    w = fake.worker
    w.kill(signal.SIGTERM)  # the fake exits 0 on SIGTERM: still unexpected
    await ready_again(fake, 2)
    assert w.state is WorkerState.READY and w.restarts == 1
    assert fake.events("sigterm", gen=1)
