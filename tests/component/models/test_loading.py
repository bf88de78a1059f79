"""``ModelManager.load``: first loads, loads whose workers fail, reloads (a failed one keeps
the old version serving; a changed configuration swaps versions under a request in flight),
and loads refused before any process starts."""

from __future__ import annotations

import asyncio

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.dispatch.worker import WorkerState
from shoal.server.models import ModelState
from tests.component.models.harness import MakeEnv, ModelEnv, Plan, alive, config, eventually, out_bytes, pid_of

pytestmark = pytest.mark.timeout(30)

LABEL = "model 'm' version 1 instance 'm_0'"


async def test_first_load_is_ready_indexed_and_described(env: ModelEnv) -> None:
    env.write(config("m", count=2))
    assert env.index() == {("m", ""): {"name": "m"}}  # in the repository, never loaded
    await env.models.load("m")
    mv = env.version("m", 1)
    assert mv.state is ModelState.READY and mv.ready and mv.reason == ""
    assert env.index() == {("m", "1"): {"name": "m", "version": "1", "state": "READY"}}
    assert env.models.index(ready_only=True) == [{"name": "m", "version": "1", "state": "READY"}]
    assert env.models.registry.all_ready() and env.plane.ready()
    assert await env.plane.model_ready("m", -1)
    assert await env.plane.model_ready("m", 1)
    assert env.plane.model_metadata("m", -1) == {
        "name": "m",
        "versions": ["1"],
        "platform": "python",
        "inputs": [{"name": "IN0", "datatype": "UINT8", "shape": [-1]}],
        "outputs": [{"name": "OUT", "datatype": "UINT8", "shape": [-1]}],
    }
    cfg = env.plane.model_config("m", 1)
    assert cfg["name"] == "m" and cfg["backend"] == "python"
    assert [(g["count"], g["kind"]) for g in cfg["instance_group"]] == [(2, "KIND_CPU")]
    # one process per instance, told what to load, each alive
    loads = sorted((e["model"], e["version"], e["instance"]) for e in env.events("load"))
    assert loads == [("m", 1, "m_0"), ("m", 1, "m_1")]
    workers = env.plane.workers()
    assert [(w["model"], w["version"], w["instance"], w["state"]) for w in workers] == [
        ("m", "1", "m_0", "READY"),
        ("m", "1", "m_1", "READY"),
    ]
    assert sorted(int(str(w["pid"])) for w in workers) == sorted(env.pids("m")) and all(map(alive, env.pids("m")))
    result = await env.infer("m", b"hello")
    assert pid_of(result) in env.pids("m")
    assert (result.model_name, result.model_version) == ("m", 1)
    assert out_bytes(result) == b"hello"


async def test_first_load_is_visible_as_loading(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"load": {"hold": gate}}]))
    load = asyncio.ensure_future(env.models.load("m"))
    await eventually(lambda: len(env.events("load_held")) == 1, "the worker to be loading")
    assert env.index() == {("m", "1"): {"name": "m", "version": "1", "state": "LOADING"}}
    assert not env.plane.ready()
    with pytest.raises(ServingError) as info:
        await env.infer("m")
    assert (info.value.code, info.value.message) == (
        ErrorCode.NOT_FOUND,
        "Request for unknown model: 'm' has no available versions",
    )
    env.open_gate(gate)
    await load
    assert env.index() == {("m", "1"): {"name": "m", "version": "1", "state": "READY"}} and env.plane.ready()


def _fail_plan(how: str) -> Plan:
    plans: dict[str, Plan] = {
        "fail": {"load": {"do": "fail", "code": "INVALID_ARGUMENT", "message": "no weights in version 1"}},
        "exit": {"load": {"do": "exit", "status": 3}},
        "hang": {"load": {"do": "hang"}},
    }
    return plans[how]


HANG_TIMEOUT_S = 1.0
"""The load timeout where a worker hangs in its load: short, yet long enough for a process to
start (and connect, which the same timeout bounds) on a loaded machine."""
FAILURES = {
    "fail": (ErrorCode.INVALID_ARGUMENT, f"failed to load {LABEL}: no weights in version 1"),
    "exit": (ErrorCode.INVALID_ARGUMENT, f"failed to load {LABEL}: worker died: exited with status 3 during load"),
    "hang": (ErrorCode.INVALID_ARGUMENT, f"failed to load {LABEL}: no answer within 1 s during load"),
}
"""Each failure's code (Triton's INVALID_ARGUMENT for any failed load) and the version's reason."""


def load_failed(model: str, *reasons: tuple[int, str]) -> str:
    """Triton's text for a load whose versions failed (ending with a newline, as Triton's)."""
    return (
        f"load failed for model '{model}': "
        + "".join(f"version {v} is at UNAVAILABLE state: {r};" for v, r in reasons)
        + "\n"
    )


@pytest.mark.parametrize("how", sorted(FAILURES))
async def test_load_whose_worker_fails_leaves_the_model_unavailable_with_the_reason(
    make_env: MakeEnv, how: str
) -> None:
    env = make_env(load_timeout_s=HANG_TIMEOUT_S if how == "hang" else 5.0)
    env.write(config("m", plans=[_fail_plan(how)]))
    code, reason = FAILURES[how]
    with pytest.raises(ServingError) as info:
        await env.models.load("m")
    assert info.value.code is code
    assert info.value.message == load_failed("m", (1, reason))
    mv = env.version("m", 1)
    assert (mv.state, mv.reason, mv.pool) == (ModelState.UNAVAILABLE, reason, None)
    assert env.index() == {("m", "1"): {"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": reason}}
    assert not env.models.registry.all_ready() and not env.plane.ready()
    with pytest.raises(ServingError) as info:
        await env.plane.model_ready("m", 1)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.message == "Request for unknown model: 'm' version 1 is not at ready state"
    # nothing left: the process is gone, its arena too, and no replacement was started
    (pid,) = env.pids()
    await env.all_exited([pid])
    assert env.segments() == [] and env.plane.workers() == []


async def test_one_failing_instance_fails_the_version_and_stops_the_others(env: ModelEnv) -> None:
    plans: dict[str, list[Plan]] = {"m_1": [{"load": {"do": "fail", "message": "instance 1 is broken"}}], "*": [{}]}
    env.write(config("m", count=3, plans=plans))
    with pytest.raises(ServingError) as info:
        await env.models.load("m")
    reason = "failed to load model 'm' version 1 instance 'm_1': instance 1 is broken"
    assert info.value.message == load_failed("m", (1, reason))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert env.version("m", 1).state is ModelState.UNAVAILABLE
    # the instances that did load are stopped with it
    assert len(env.pids("m")) == 3
    await env.all_exited(env.pids("m"))
    assert env.segments() == []


async def test_max_worker_processes_refuses_a_load_before_any_process_starts(make_env: MakeEnv) -> None:
    env = make_env(max_workers=2)
    env.write(config("small"))
    env.write(config("big", count=2))
    await env.models.load("small")
    with pytest.raises(ServingError) as info:
        await env.models.load("big")
    reason = "model 'big' version 1 needs 2 worker processes; the server runs 1 of at most 2 (--max-worker-processes)"
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == load_failed("big", (1, reason))
    assert env.index()[("big", "1")] == {"name": "big", "version": "1", "state": "UNAVAILABLE", "reason": reason}
    assert env.pids("big") == [] and len(env.pids()) == 1
    # unloading frees the processes for the next load
    await env.models.unload("small")
    await env.models.load("big")
    assert env.version("big", 1).ready


async def test_unknown_and_invalid_names_are_refused_and_leave_no_trace(env: ModelEnv) -> None:
    with pytest.raises(ServingError) as info:
        await env.models.load("nope")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == "failed to load 'nope', failed to poll from model repository"
    for name in ("..", "a/b", "", "x\x00y"):
        with pytest.raises(ServingError) as info:
            await env.models.load(name)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert "invalid model name" in info.value.message or "Model name cannot be empty" in info.value.message
    assert env.index() == {} and env.pids() == []
    with pytest.raises(ServingError) as info:
        await env.plane.model_ready("nope", -1)
    assert info.value.message == "Request for unknown model: 'nope' is not found"


@pytest.mark.parametrize("how", sorted(FAILURES))
async def test_failed_reload_keeps_the_old_version_serving(make_env: MakeEnv, how: str) -> None:
    env = make_env(load_timeout_s=HANG_TIMEOUT_S if how == "hang" else 5.0)
    env.write(config("m"))
    await env.models.load("m")
    old = env.version("m", 1)
    (old_pid,) = env.pids("m")
    env.write(config("m", plans=[_fail_plan(how)]))  # a changed configuration whose worker fails
    code, reason = FAILURES[how]
    with pytest.raises(ServingError) as info:
        await env.models.load("m")
    assert info.value.code is code
    assert info.value.message == load_failed("m", (1, reason))
    assert env.version("m", 1) is old and old.state is ModelState.READY
    assert env.index()[("m", "1")] == {
        "name": "m",
        "version": "1",
        "state": "READY",
        "reason": f"reload failed, still serving: version 1: {reason}",
    }
    result = await env.infer("m", b"still")
    assert pid_of(result) == old_pid and out_bytes(result) == b"still"
    new_pid = env.pids()[-1]
    await env.all_exited([new_pid])
    assert alive(old_pid)
    # fixed: the reload goes through, and the reason is gone
    env.write(config("m", parameters={"fixed": "yes"}))
    await env.models.load("m")
    assert env.version("m", 1) is not old and env.version("m", 1).ready
    assert env.index()[("m", "1")] == {"name": "m", "version": "1", "state": "READY"}
    await env.all_exited([old_pid])
    assert (old.state, old.reason) == (ModelState.UNAVAILABLE, "unloaded")


async def test_failed_reload_of_one_version_keeps_that_version_and_the_others(env: ModelEnv) -> None:
    env.write(config("m", latest=2), versions=(1, 2))
    await env.models.load("m")
    v1, v2 = env.version("m", 1), env.version("m", 2)
    # version 2 changes (a file of its directory) and its new process fails; version 1 is unchanged
    env.add_version("m", 2, plans=[{"load": {"do": "fail", "message": "version 2 is corrupt"}}])
    with pytest.raises(ServingError) as info:
        await env.models.load("m")
    reason = "version 2: failed to load model 'm' version 2 instance 'm_0': version 2 is corrupt"
    assert info.value.message == load_failed("m", (2, reason.removeprefix("version 2: ")))
    assert env.version("m", 1) is v1 and env.version("m", 2) is v2 and v1.ready and v2.ready
    assert env.index()[("m", "2")]["reason"] == f"reload failed, still serving: {reason}"
    assert out_bytes(await env.infer("m", b"two", version=2)) == b"two"
    assert len(env.live_pids("m")) == 2 and len(env.pids("m", 2)) == 2


async def test_unreadable_config_on_reload_keeps_the_old_version_serving(env: ModelEnv) -> None:
    path = env.write(config("m"))
    await env.models.load("m")
    old = env.version("m", 1)
    env.write_file(path / "config.pbtxt", "this is { not a config")
    with pytest.raises(ServingError) as info:
        await env.models.load("m")
    # Triton's text; the reason is in the log and the repository index
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == "failed to load 'm', failed to poll from model repository"
    assert env.version("m", 1) is old and old.ready
    entry = env.index()[("m", "1")]
    assert entry["state"] == "READY" and entry["reason"].startswith("reload failed, still serving: model 'm': config")
    assert len(env.pids()) == 1  # nothing was started
    assert out_bytes(await env.infer("m", b"ok")) == b"ok"


async def test_reload_with_a_changed_config_swaps_versions_under_a_request_in_flight(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"infer": [{"hold": gate}]}]))
    await env.models.load("m")
    old = env.version("m", 1)
    (old_pid,) = env.pids("m")
    held = asyncio.ensure_future(env.infer("m", b"old"))
    await eventually(lambda: len(env.events("infer")) == 1, "the request to reach the old worker")
    env.write(config("m", count=2))  # changed: two instances, plain echo
    reload = asyncio.ensure_future(env.models.load("m"))
    # the new version is swapped in while the old one still runs the request
    await eventually(lambda: env.version("m", 1) is not old, "the new version to be swapped in")
    new = env.version("m", 1)
    assert new.ready and old.state is ModelState.UNLOADING
    assert not held.done() and not reload.done()
    new_pids = env.pids("m")[1:]
    assert len(new_pids) == 2
    result = await env.infer("m", b"new")
    assert pid_of(result) in new_pids and out_bytes(result) == b"new"
    assert alive(old_pid)
    env.open_gate(gate)
    result = await held
    assert pid_of(result) == old_pid and out_bytes(result) == b"old"
    await reload
    assert (old.state, old.reason) == (ModelState.UNAVAILABLE, "unloaded")
    await env.all_exited([old_pid])
    assert all(map(alive, new_pids))
    assert sorted(int(str(w["pid"])) for w in env.plane.workers()) == sorted(new_pids)


async def test_loading_again_without_changes_restarts_nothing(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.models.load("m")
    mv = env.version("m", 1)
    workers = list(mv.pool.workers) if mv.pool else []
    await env.models.load("m")
    assert env.version("m", 1) is mv and mv.ready
    assert len(env.pids()) == 1 and [w.state for w in workers] == [WorkerState.READY]


async def test_old_worker_dying_during_a_reload_is_stopped_with_its_version(env: ModelEnv) -> None:
    old_gate, new_gate = env.gate(), env.gate()
    # the old version's replacement process (generation 2) and the new version load slowly
    env.write(config("m", plans=[{}, {"load": {"hold": old_gate}}]))
    await env.models.load("m")
    old = env.version("m", 1)
    assert old.pool is not None
    (worker,) = old.pool.workers
    env.write(config("m", plans=[{"load": {"hold": new_gate}}]))
    reload = asyncio.ensure_future(env.models.load("m"))
    await eventually(lambda: len(env.events("load_held")) == 1, "the new version to be loading")
    worker.kill()  # the old version's only worker dies while the new one loads
    await eventually(lambda: len(env.events("load_held")) == 2, "the old worker's replacement to be loading")
    assert worker.state is WorkerState.RESTARTING and not old.ready
    with pytest.raises(ServingError) as info:
        await env.infer("m")
    assert (info.value.code, info.value.message) == (
        ErrorCode.NOT_FOUND,
        "Request for unknown model: 'm' has no available versions",
    )
    env.open_gate(new_gate)
    await reload
    new = env.version("m", 1)
    assert new is not old and new.ready
    assert (old.state, worker.state) == (ModelState.UNAVAILABLE, WorkerState.STOPPED)
    first, new_pid, replacement = env.pids()
    await env.all_exited([first, replacement])
    assert env.live_pids() == [new_pid] and replacement not in env.pids("m")  # the replacement never loaded
    assert pid_of(await env.infer("m")) == new_pid


@pytest.mark.parametrize("how", ["unreadable config", "failing workers"])
async def test_failed_reload_keeps_an_old_version_whose_worker_is_restarting(env: ModelEnv, how: str) -> None:
    gate = env.gate()
    path = env.write(config("m", plans=[{}, {"load": {"hold": gate}}]))
    await env.models.load("m")
    old = env.version("m", 1)
    assert old.pool is not None
    (worker,) = old.pool.workers
    worker.kill()  # crashed: its replacement is loading (held) when the reload comes
    await eventually(lambda: len(env.events("load_held")) == 1, "the replacement to be loading")
    if how == "unreadable config":
        env.write_file(path / "config.pbtxt", "this is { not a config")
    else:
        env.write(config("m", plans=[{"load": {"do": "fail", "message": "broken"}}]))
    with pytest.raises(ServingError):
        await env.models.load("m")
    env.open_gate(gate)
    assert env.models.registry.models["m"].get(1) is old
    await eventually(lambda: old.ready, "the old version to serve again")
    assert worker.state is WorkerState.READY
