"""``ModelManager.unload`` (drains, refuses, stops), ``restart_instance``, a worker that dies
under a request, and ``stop``."""

from __future__ import annotations

import asyncio

import pytest

from shoal.proto.errors import ErrorCode, ServingError, WorkerDied
from shoal.server.dispatch.worker import WorkerState
from shoal.server.models import ModelState, submit
from tests.component.models.harness import MakeEnv, ModelEnv, alive, config, eventually, out_bytes, pid_of

pytestmark = pytest.mark.timeout(30)

NO_VERSIONS = "Request for unknown model: 'm' has no available versions"


async def test_unload_drains_requests_in_flight_refuses_new_ones_and_stops_the_workers(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"infer": [{"hold": gate}]}]))
    await env.models.load("m")
    mv = env.version("m", 1)
    (pid,) = env.pids("m")
    big = b"in flight " * 20  # over the inline limit: it waits in the router's input arena
    held = asyncio.ensure_future(env.infer("m", big))
    await eventually(lambda: len(env.events("infer")) == 1, "the request to reach the worker")
    unload = asyncio.ensure_future(env.models.unload("m"))
    await eventually(lambda: mv.state is ModelState.UNLOADING, "the version to be UNLOADING")
    # new requests fail at once, by lookup ...
    for version, message in ((-1, NO_VERSIONS), (1, "Request for unknown model: 'm' version 1 is not at ready state")):
        with pytest.raises(ServingError) as info:
            await env.infer("m", b"late", version)
        code = ErrorCode.NOT_FOUND if version < 0 else ErrorCode.UNAVAILABLE  # Triton's codes
        assert (info.value.code, info.value.message) == (code, message)
    # ... and one that looked the version up just before the unload is refused by its scheduler
    with pytest.raises(ServingError) as info:
        await submit(mv, env.request("m"))
    assert (info.value.code, info.value.message) == (ErrorCode.UNAVAILABLE, "the model is being unloaded")
    assert not held.done() and not unload.done() and alive(pid)
    env.open_gate(gate)
    assert out_bytes(await held) == big
    await unload
    assert env.arena.stats().live_blocks == 0
    assert (mv.state, mv.reason) == (ModelState.UNAVAILABLE, "unloaded")
    assert not alive(pid) and env.segments() == []
    assert env.index() == {("m", "1"): {"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}}
    assert env.plane.ready()  # an unloaded model is no longer wanted
    with pytest.raises(ServingError) as info:
        await env.infer("m")
    assert (info.value.code, info.value.message) == (ErrorCode.NOT_FOUND, NO_VERSIONS)
    # only the request that ran was counted
    assert mv.stats.inference_count == 1
    # and it loads again
    await env.models.load("m")
    assert env.version("m", 1).ready and len(env.pids("m")) == 2


async def test_unloading_a_model_that_is_not_loaded_changes_nothing(env: ModelEnv) -> None:
    """As Triton (its model repository manager): success, nothing loaded or unloaded."""
    env.write(config("m"))  # in the repository, never loaded
    env.write(config("other"))
    await env.models.load("other")
    for name in ("m", "nope", "m"):
        await env.models.unload(name)
        await env.models.unload(name, dependents=True)
    assert "m" not in env.models.registry.models
    assert env.version("other", 1).ready
    await env.models.load("m")
    assert env.version("m", 1).ready
    with pytest.raises(ServingError) as info:
        await env.models.unload("../m")
    assert info.value.message == "invalid model name '../m', model name must not contain path traversal characters"


async def test_restart_instance_replaces_one_process_and_refuses_unknown_instances(env: ModelEnv) -> None:
    env.write(config("m", count=2))
    await env.models.load("m")
    with pytest.raises(ServingError) as info:
        await env.models.restart_instance("nope", "nope_0")
    assert (info.value.code, info.value.message) == (ErrorCode.NOT_FOUND, "model 'nope' is not loaded")
    with pytest.raises(ServingError) as info:
        await env.models.restart_instance("m", "m_7")
    assert (info.value.code, info.value.message) == (ErrorCode.NOT_FOUND, "model 'm' has no instance 'm_7'")
    with pytest.raises(ServingError) as info:
        await env.plane.restart_worker("m", "m_0", 2)
    assert (info.value.code, info.value.message) == (
        ErrorCode.NOT_FOUND,
        "version 2 of model 'm' has no instance 'm_0'",
    )
    assert len(env.pids()) == 2  # nothing was restarted
    before = {e["instance"]: e["pid"] for e in env.events("load")}
    (entry,) = await env.plane.restart_worker("m", "m_0", 1)
    assert entry["model"] == "m" and entry["instance"] == "m_0" and entry["state"] == "READY"
    assert entry["restarts"] == 1 and entry["pid"] not in before.values()
    await env.all_exited([before["m_0"]])
    assert alive(before["m_1"]) and alive(int(str(entry["pid"])))
    assert env.version("m", 1).ready
    assert len({pid_of(await env.infer("m")) for _ in range(4)} - {entry["pid"], before["m_1"]}) == 0


async def test_restart_of_an_unloaded_model_is_refused_and_starts_nothing(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.models.load("m")
    await env.models.unload("m")
    with pytest.raises(ServingError) as info:
        await env.models.restart_instance("m", "m_0")
    assert info.value.code in (ErrorCode.NOT_FOUND, ErrorCode.FAILED_PRECONDITION)
    assert len(env.pids()) == 1 and env.live_pids() == []


async def test_restart_worker_needs_the_admin_api(make_env: MakeEnv) -> None:
    env = make_env(allow_admin=False)
    env.write(config("m"))
    await env.models.load("m")
    with pytest.raises(ServingError) as info:
        await env.plane.restart_worker("m", "m_0", -1)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.message == "restarting workers is not allowed: start the server with --allow-admin-api=true"
    assert len(env.pids()) == 1


async def test_worker_dying_under_a_request_fails_it_and_is_replaced(env: ModelEnv) -> None:
    env.write(config("m", plans=[{"infer": [{"outputs": "shm"}, {"signal": "SIGKILL"}]}, {}]))
    await env.models.load("m")
    (pid,) = env.pids("m")
    assert out_bytes(await env.infer("m", b"first")) == b"first"
    (segment,) = env.segments()  # the worker's output arena, left behind by a SIGKILL
    with pytest.raises(WorkerDied) as info:
        await env.infer("m", b"x" * 100)  # its input block is given back when the worker dies
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.message == f"model 'm' version 1 instance 'm_0' (pid {pid}) died: killed by signal SIGKILL"
    mv = env.version("m", 1)
    assert mv.stats.failures["BACKEND"] == 1
    assert env.arena.stats().live_blocks == 0
    await eventually(lambda: mv.ready and len(env.pids("m")) == 2, "the replacement to be READY")
    assert mv.state is ModelState.READY
    result = await env.infer("m", b"again")
    assert pid_of(result) == env.pids("m")[1] and out_bytes(result) == b"again"
    assert env.plane.workers()[0]["restarts"] == 1
    assert segment not in env.segments()  # the router removed the dead worker's arena


async def test_stop_stops_every_worker_of_every_model(env: ModelEnv) -> None:
    env.write(config("a", count=2))
    env.write(config("b"))
    await env.models.load_all()
    assert sorted(env.models.registry.models) == ["a", "b"] and len(env.pids()) == 3
    workers = env.models.registry.workers()
    await env.models.stop(2.0)
    assert not any(alive(p) for p in env.pids())
    assert {w.state for w in workers} == {WorkerState.STOPPED}
    assert {(mv.state, mv.reason) for mv in env.models.registry.versions()} == {(ModelState.UNAVAILABLE, "unloaded")}
    assert env.segments() == []


async def test_unload_unmaps_the_output_arenas_of_its_workers(env: ModelEnv) -> None:
    env.write(config("m", plans=[{"infer_default": {"outputs": "shm"}}]))
    await env.models.load("m")
    assert out_bytes(await env.infer("m", b"through shm")) == b"through shm"
    assert len(env.mapped_worker_segments()) == 1  # the router mapped the worker's arena
    await env.models.unload("m")
    assert env.segments() == []  # unlinked ...
    assert env.mapped_worker_segments() == []  # ... and no longer mapped by the router
