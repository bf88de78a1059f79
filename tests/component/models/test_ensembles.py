"""Ensembles under the ``ModelManager``: composing models loaded with the ensemble, served
through it, unloaded with it (``unload_dependents``), failing composing models and cycles."""

from __future__ import annotations

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.models import ModelState
from tests.component.models.harness import MakeEnv, ModelEnv, config, ensemble_config, out_bytes

pytestmark = pytest.mark.timeout(30)


def loaded(env: ModelEnv) -> dict[str, list[str]]:
    return {name: [mv.state.value for mv in versions.values()] for name, versions in env.models.registry.models.items()}


async def test_ensemble_loads_its_composing_models_serves_and_unloads_them(env: ModelEnv) -> None:
    env.write(config("a"))
    env.write(config("b"))
    env.write(ensemble_config("e", "a", "b"))
    await env.models.load("e")
    assert loaded(env) == {"a": ["READY"], "b": ["READY"], "e": ["READY"]}
    assert sorted(e["model"] for e in env.events("load")) == ["a", "b"]  # an ensemble has no process
    assert env.plane.model_metadata("e", -1)["platform"] == "ensemble"
    result = await env.infer("e", b"through two steps")
    assert [o.name for o in result.outputs] == ["OUT"]
    assert out_bytes(result) == b"through two steps"
    assert sorted(env.pids(m)[0] for m in "ab") == sorted(e["pid"] for e in env.events("infer"))
    assert env.models.registry.ensembles_using("a") == ["e"]
    # unloading the ensemble with its dependents unloads the composing models no other uses
    await env.plane.unload_model("e", {"unload_dependents": True})
    assert loaded(env) == {"a": ["UNAVAILABLE"], "b": ["UNAVAILABLE"], "e": ["UNAVAILABLE"]}
    await env.all_exited(env.pids())


async def test_unloading_a_composing_model_makes_the_ensemble_unavailable_until_it_returns(env: ModelEnv) -> None:
    env.write(config("a"))
    env.write(config("b"))
    env.write(ensemble_config("e", "a", "b"))
    await env.models.load("e")
    await env.models.unload("b")  # without dependents: the ensemble stays loaded
    assert loaded(env) == {"a": ["READY"], "b": ["UNAVAILABLE"], "e": ["READY"]}
    why = "composing model 'b' is not available"
    assert env.index()[("e", "1")] == {"name": "e", "version": "1", "state": "UNAVAILABLE", "reason": why}
    with pytest.raises(ServingError) as info:
        await env.infer("e")
    # Triton's text and code; the repository index says why
    assert info.value.code is ErrorCode.NOT_FOUND
    assert info.value.message == "Request for unknown model: 'e' has no available versions"
    assert not env.plane.ready()
    await env.models.load("b")
    assert out_bytes(await env.infer("e", b"back")) == b"back"
    # unloading a composing model with its dependents takes the ensemble along
    await env.models.unload("a", dependents=True)
    assert loaded(env) == {"a": ["UNAVAILABLE"], "b": ["READY"], "e": ["UNAVAILABLE"]}


async def test_ensemble_whose_composing_model_fails_is_unavailable_with_the_reason(env: ModelEnv) -> None:
    env.write(config("a", plans=[{"load": {"do": "fail", "message": "a is broken"}}]))
    env.write(config("b"))
    env.write(ensemble_config("e", "a", "b"))
    with pytest.raises(ServingError) as info:
        await env.models.load("e")
    a_reason = "version 1 is at UNAVAILABLE state: failed to load model 'a' version 1 instance 'a_0': a is broken;"
    reason = f"composing model 'a' failed to load: load failed for model 'a': {a_reason}"
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == f"failed to load 'e': {reason}"
    assert env.index()[("e", "")] == {"name": "e", "state": "UNAVAILABLE", "reason": reason}
    assert env.index()[("a", "1")]["state"] == "UNAVAILABLE"
    assert "b" not in env.models.registry.models  # the steps after the failing one were not loaded
    await env.all_exited(env.pids())
    with pytest.raises(ServingError) as info:
        await env.infer("e")
    assert (info.value.code, info.value.message) == (
        ErrorCode.NOT_FOUND,
        "Request for unknown model: 'e' has no available versions",
    )


async def test_ensembles_forming_a_cycle_are_refused_before_anything_starts(env: ModelEnv) -> None:
    env.write(config("a"))
    env.write(ensemble_config("e1", "a", "e2"))
    env.write(ensemble_config("e2", "e1"))
    for name, cycle in (("e1", "e1 -> e2 -> e1"), ("e2", "e2 -> e1 -> e2")):
        with pytest.raises(ServingError) as info:
            await env.models.load(name)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert info.value.message == f"failed to load '{name}': ensembles form a cycle: {cycle}"
        assert env.index()[(name, "")]["reason"] == f"ensembles form a cycle: {cycle}"
    assert env.pids() == [] and "a" not in env.models.registry.models
    # a self-reference is a cycle too
    env.write(ensemble_config("e3", "e3"))
    with pytest.raises(ServingError) as info:
        await env.models.load("e3")
    assert info.value.message == "failed to load 'e3': ensembles form a cycle: e3 -> e3"
    assert {mv.state for mv in env.models.registry.versions()} <= {ModelState.UNAVAILABLE}


async def test_shared_composing_model_stays_while_another_ensemble_uses_it(env: ModelEnv) -> None:
    env.write(config("shared"))
    env.write(config("own"))
    env.write(ensemble_config("e1", "shared", "own"))
    env.write(ensemble_config("e2", "shared"))
    await env.models.load("e1")
    await env.models.load("e2")
    assert len(env.pids("shared")) == 1  # loaded once, for both
    await env.models.unload("e1", dependents=True)
    assert loaded(env) == {"shared": ["READY"], "own": ["UNAVAILABLE"], "e1": ["UNAVAILABLE"], "e2": ["READY"]}
    assert out_bytes(await env.infer("e2", b"still")) == b"still"


async def test_poll_loads_a_failed_ensemble_again_once_its_composing_model_appears(make_env: MakeEnv) -> None:
    env = make_env(mode="poll")
    env.write(ensemble_config("e", "a"))
    await env.models.load_all()
    reason = "composing model 'a' failed to load: failed to load 'a', failed to poll from model repository"
    assert env.index() == {("e", ""): {"name": "e", "state": "UNAVAILABLE", "reason": reason}}
    env.write(config("a"))
    await env.models.poll_once()
    assert loaded(env) == {"a": ["READY"], "e": ["READY"]}
    assert out_bytes(await env.infer("e", b"late")) == b"late"
