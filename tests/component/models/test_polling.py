"""``ModelManager.poll_once``: version policy changes, versions and models that appear, fail
or disappear, broken configurations, and the remote-repository refresh before each poll."""

from __future__ import annotations

import shutil

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.models import ModelState
from tests.component.models.harness import MakeEnv, ModelEnv, alive, config, out_bytes

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def env(make_env: MakeEnv) -> ModelEnv:
    return make_env(mode="poll")


def serving(env: ModelEnv, name: str) -> dict[int, ModelState]:
    return {v: mv.state for v, mv in env.models.registry.models.get(name, {}).items()}


async def test_version_policy_change_is_followed(env: ModelEnv) -> None:
    env.write(config("m", latest=1), versions=(1, 2, 3))
    await env.models.load_all()
    assert serving(env, "m") == {3: ModelState.READY}
    assert [e["version"] for e in env.events("load")] == [3]
    v3 = env.version("m", 3)
    await env.models.poll_once()  # nothing changed: nothing restarts
    assert env.version("m", 3) is v3 and len(env.pids()) == 1
    env.write(config("m", latest=2))
    await env.models.poll_once()
    assert serving(env, "m") == {2: ModelState.READY, 3: ModelState.READY}
    assert env.models.index(ready_only=True) == [
        {"name": "m", "version": "2", "state": "READY"},
        {"name": "m", "version": "3", "state": "READY"},
    ]
    assert env.plane.model_metadata("m", -1)["versions"] == ["2", "3"]
    assert out_bytes(await env.infer("m", b"two", version=2)) == b"two"
    # exactly one process per served version is left running
    assert sorted(len(env.live_pids("m", v)) for v in (1, 2, 3)) == [0, 1, 1]
    # and back: version 2 is retired and forgotten
    v2 = env.version("m", 2)
    env.write(config("m", latest=1))
    await env.models.poll_once()
    assert serving(env, "m") == {3: ModelState.READY}
    assert (v2.state, v2.reason) == (ModelState.UNAVAILABLE, "unloaded")
    await env.all_exited(env.pids("m", 2))
    with pytest.raises(ServingError) as info:
        await env.plane.model_ready("m", 2)
    assert (info.value.code, info.value.message) == (
        ErrorCode.NOT_FOUND,
        "Request for unknown model: 'm' version 2 is not found",
    )


async def test_models_and_versions_that_appear_or_disappear_are_followed(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.models.load_all()
    v1 = env.version("m", 1)
    # a new model
    env.write(config("fresh"))
    await env.models.poll_once()
    assert env.version("fresh", 1).ready and env.version("m", 1) is v1
    # a new version: latest 1 serves it and retires version 1
    env.add_version("m", 2)
    await env.models.poll_once()
    assert serving(env, "m") == {2: ModelState.READY}
    assert v1.state is ModelState.UNAVAILABLE
    await env.all_exited(env.pids("m", 1))
    # a removed model is unloaded
    shutil.rmtree(env.repo / "fresh")
    await env.models.poll_once()
    assert serving(env, "fresh") == {1: ModelState.UNAVAILABLE}
    await env.all_exited(env.pids("fresh"))
    with pytest.raises(ServingError) as info:
        await env.infer("fresh")
    assert info.value.message == "Request for unknown model: 'fresh' has no available versions"
    assert env.version("m", 2).ready and env.plane.ready()


async def test_broken_config_keeps_the_version_serving_until_fixed(env: ModelEnv) -> None:
    path = env.write(config("m"))
    await env.models.load_all()
    v1 = env.version("m", 1)
    good = (path / "config.pbtxt").read_text()
    env.write_file(path / "config.pbtxt", "this is { not a config")
    await env.models.poll_once()
    assert env.version("m", 1) is v1 and v1.ready
    entry = env.index()[("m", "1")]
    assert entry["state"] == "READY"
    assert entry["reason"].startswith("reload failed, still serving: model 'm': config.pbtxt: ")
    assert out_bytes(await env.infer("m", b"ok")) == b"ok"
    env.write_file(path / "config.pbtxt", good)
    await env.models.poll_once()
    assert env.index()[("m", "1")] == {"name": "m", "version": "1", "state": "READY"}
    assert env.version("m", 1).ready


async def test_new_version_that_fails_to_load_keeps_the_old_one_serving(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.models.load_all()
    v1 = env.version("m", 1)
    vdir = env.add_version("m", 2, plans=[{"load": {"do": "fail", "message": "version 2 is corrupt"}}])
    await env.models.poll_once()
    assert serving(env, "m") == {1: ModelState.READY} and env.version("m", 1) is v1
    reason = "version 2: failed to load model 'm' version 2 instance 'm_0': version 2 is corrupt"
    assert env.index()[("m", "1")]["reason"] == f"reload failed, still serving: {reason}"
    await env.all_exited(env.pids("m", 2))
    # an unchanged repository is not retried
    await env.models.poll_once()
    assert len(env.pids("m", 2)) == 1
    # fixed: version 2 serves, version 1 goes
    (vdir / "fake_plans.json").unlink()
    await env.models.poll_once()
    assert serving(env, "m") == {2: ModelState.READY}
    assert env.index() == {("m", "2"): {"name": "m", "version": "2", "state": "READY"}}
    await env.all_exited(env.pids("m", 1))
    assert [alive(p) for p in env.pids("m", 2)] == [False, True]


async def test_remote_refresh_runs_before_each_poll(env: ModelEnv) -> None:
    calls: list[int] = []

    async def refresh() -> None:
        calls.append(1)
        if len(calls) == 2:
            env.write(config("synced"))  # the remote copy brought a new model

    env.models.refresh = refresh
    await env.models.poll_once()
    assert calls == [1] and env.models.registry.models == {}
    await env.models.poll_once()
    assert calls == [1, 1] and env.version("synced", 1).ready
