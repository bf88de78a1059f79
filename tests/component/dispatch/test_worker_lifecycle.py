"""``Worker`` start, load failures, stop and restart against a scripted worker process."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from shoal.proto.errors import ErrorCode, ModelNotReady, ServingError
from shoal.server.dispatch.worker import WorkerState
from tests.component.dispatch.harness import Harness, alive, answered_by, eventually, out_bytes, request

pytestmark = pytest.mark.timeout(30)

LABEL = "model 'm' version 1 instance 'm_0'"


async def test_start_sends_load_after_hello_and_becomes_ready(harness: Harness) -> None:
    fake = await harness.started(heartbeat_timeout_s=3.0)
    w = fake.worker
    assert w.state is WorkerState.READY and w.ready
    assert w.generation == 1 and w.restarts == 0 and w.reason == ""
    start = fake.events("start")[0]
    assert w.pid == start["pid"] and alive(w.pid)
    # the spawn line of the product: <python> -P -m shoal.workers ...
    assert start["no_path"] and start["module"] == "shoal.workers"
    assert start["parent_pid"] == os.getpid()
    assert start["heartbeat_ms"] == 500  # a heartbeat every sixth of heartbeat_timeout_s
    load = fake.events("load")[0]
    assert (load["model"], load["version"], load["instance"]) == ("m", 1, "m_0")
    assert load["arena_prefix"] == f"{w.arena_prefix_base}_g1" == w.arena_prefix
    assert load["arena_prefix"].startswith(harness.prefix)


async def test_load_failure_fails_start_with_the_workers_message(harness: Harness) -> None:
    fake = harness.add({"load": {"do": "fail", "code": "INVALID_ARGUMENT", "message": "no model.onnx in version 1"}})
    with pytest.raises(ServingError) as info:
        await fake.worker.start()
    err = info.value
    assert err.message == f"failed to load {LABEL}: no model.onnx in version 1"
    assert err.code is ErrorCode.INVALID_ARGUMENT
    w = fake.worker
    assert w.state is WorkerState.FAILED and not w.ready
    assert w.reason == err.message
    # the process was told to go, and no replacement was started
    await fake.event("sigterm")
    await eventually(lambda: not alive(fake.pids()[0]), "the worker to exit")
    assert w.restarts == 0 and len(fake.pids()) == 1 and fake.exits == []


async def test_load_timeout_terminates_the_worker(harness: Harness) -> None:
    # the timeout bounds the connect (a fresh interpreter: slow on a loaded machine) and the
    # load, each: long enough for the connect, short against the harness's 5 s
    fake = harness.add({"load": {"do": "hang"}}, load_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServingError) as info:
        await fake.worker.start()
    assert time.monotonic() - t0 < 4.0
    assert info.value.message.startswith(f"failed to load {LABEL}: no answer within")
    assert info.value.message.endswith("during load")
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert fake.worker.state is WorkerState.FAILED
    await fake.event("sigterm")
    await eventually(lambda: not alive(fake.pids()[0]), "the worker to exit")


async def test_no_hello_times_out_during_connect(harness: Harness) -> None:
    fake = harness.add({"hello": False}, load_timeout_s=0.3)
    with pytest.raises(ServingError, match=r"no answer within .* during connect$"):
        await fake.worker.start()
    assert fake.events("load") == []
    assert fake.worker.state is WorkerState.FAILED


async def test_worker_exiting_during_load_is_reported(harness: Harness) -> None:
    fake = harness.add({"load": {"do": "exit", "status": 7}})
    with pytest.raises(ServingError) as info:
        await fake.worker.start()
    assert info.value.message == f"failed to load {LABEL}: worker died: exited with status 7 during load"
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert fake.worker.state is WorkerState.FAILED and fake.worker.restarts == 0


async def test_missing_launcher_cannot_start(harness: Harness) -> None:
    fake = harness.add(python=str(harness.tmp / "no-such-python"))
    with pytest.raises(ServingError) as info:
        await fake.worker.start()
    assert info.value.message.startswith(f"cannot start a worker process for {LABEL}: ")
    assert "No such file or directory" in info.value.message
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert fake.worker.state is WorkerState.FAILED
    assert fake.worker.reason == info.value.message
    assert fake.events() == []


async def test_stop_sends_shutdown_and_the_process_exits(harness: Harness) -> None:
    fake = await harness.started({"infer_default": {"outputs": "shm"}})
    w = fake.worker
    results = await harness.pool(fake).run([request(b"keep")])
    assert out_bytes(results[0]) == b"keep"  # an output block the worker still holds
    assert fake.segments(gen=1)
    pid = w.pid
    await w.stop(timeout_s=5.0)
    assert w.state is WorkerState.STOPPED
    assert fake.events("shutdown") and fake.events("sigterm") == []
    assert fake.events("exit")[0]["status"] == 0
    assert not alive(pid)
    assert fake.segments() == []
    assert harness.pool(fake).ready_count == 0
    with pytest.raises(ModelNotReady):
        harness.pool(fake).pick()


async def test_stop_kills_a_worker_that_ignores_shutdown(harness: Harness) -> None:
    fake = await harness.started({"on_shutdown": "ignore"})
    pid = fake.worker.pid
    t0 = time.monotonic()
    await fake.worker.stop(timeout_s=0.3)
    assert time.monotonic() - t0 < 3.0
    assert fake.events("shutdown") and fake.events("exit") == []
    assert not alive(pid)
    assert fake.worker.state is WorkerState.STOPPED


async def test_stop_fails_batches_still_in_flight(harness: Harness) -> None:
    fake = await harness.started({"infer_default": {"hang": True}})
    pool = harness.pool(fake)
    task = asyncio.ensure_future(pool.run([request(b"x" * 100)]))
    await fake.event("hang")
    await fake.worker.stop(timeout_s=0.2)  # Shutdown is never read: killed
    with pytest.raises(ServingError) as info:
        await asyncio.wait_for(task, 5.0)
    assert info.value.message.startswith(LABEL)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert harness.arena.stats().live_blocks == 0


async def test_restart_drains_then_replaces_the_process(harness: Harness) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer": [{"hold": gate}]}, {})
    w = fake.worker
    pool = harness.pool(fake)
    old_pid = w.pid
    batch = asyncio.ensure_future(pool.run([request(b"in flight")]))
    await fake.event("infer", gen=1)
    restart = asyncio.ensure_future(w.restart(drain_timeout_s=5.0))
    await eventually(lambda: w.state is WorkerState.DRAINING, "DRAINING")
    # no new work while draining, and the batch in flight is not cut short
    with pytest.raises(ModelNotReady):
        pool.pick()
    with pytest.raises(ModelNotReady):
        await pool.run([request(b"new")], worker=w)
    await asyncio.sleep(0.15)
    assert fake.events("arrived") == [] and not batch.done()  # no Shutdown before the batch is done
    harness.open_gate(gate)
    results = await batch
    assert out_bytes(results[0]) == b"in flight" and answered_by(results[0]) == old_pid
    await asyncio.wait_for(restart, 5.0)
    assert fake.events("shutdown", gen=1) and fake.events("exit", gen=1)[0]["status"] == 0
    assert w.state is WorkerState.READY and w.generation == 2 and w.restarts == 1
    assert w.pid != old_pid and not alive(old_pid)
    assert fake.exits == [(1, f"{w.arena_prefix_base}_g1")]
    results = await pool.run([request(b"after")])
    assert answered_by(results[0]) == w.pid


async def test_restart_refused_unless_ready(harness: Harness) -> None:
    fake = harness.add({"load": {"do": "fail", "message": "nope"}})
    with pytest.raises(ServingError):
        await fake.worker.start()
    with pytest.raises(ServingError, match="is FAILED, not READY") as info:
        await fake.worker.restart(drain_timeout_s=1.0)
    assert info.value.code is ErrorCode.FAILED_PRECONDITION


async def test_restart_replaces_a_worker_still_busy_after_the_drain_time(harness: Harness) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer": [{"hold": gate}]}, {})
    w = fake.worker
    batch = asyncio.ensure_future(harness.pool(fake).run([request(b"long")]))
    await fake.event("infer", gen=1)
    restart = asyncio.ensure_future(w.restart(drain_timeout_s=0.2))
    arrived = await fake.event("arrived")
    assert arrived["kind"] == "shutdown" and arrived["busy"] == 1
    harness.open_gate(gate)  # the worker answers what it has, then reads the Shutdown
    assert out_bytes((await asyncio.wait_for(batch, 5.0))[0]) == b"long"
    await asyncio.wait_for(restart, 5.0)
    assert w.ready and w.generation == 2
