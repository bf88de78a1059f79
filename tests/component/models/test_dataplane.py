"""``DataPlane`` over the real ``ModelManager``: the model-repository extension (load with a
configuration override, refused parameters, control mode), lookups and their errors,
admission during a drain, and statistics."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from shoal.proto.errors import BackendError, ErrorCode, ServingError
from shoal.server.models import ModelState, submit
from shoal.server.types import InputTensor
from tests.component.models.harness import MakeEnv, ModelEnv, config, eventually, out_bytes

pytestmark = pytest.mark.timeout(30)


def override(env: ModelEnv, **changes: Any) -> str:
    """The served configuration of 'm' as JSON (what a client sends), with ``changes``."""
    cfg = env.plane.model_config("m", -1)
    cfg.update(changes)
    return orjson.dumps(cfg).decode()


async def test_load_with_a_config_override_uses_it_instead_of_config_pbtxt(env: ModelEnv) -> None:
    path = env.write(config("m"))
    await env.plane.load_model("m", {})
    first = env.version("m", 1)
    two = override(env, instance_group=[{"kind": "KIND_CPU", "count": 2}])
    await env.plane.load_model("m", {"config": two})
    mv = env.version("m", 1)
    assert mv is not first and mv.ready and first.state is ModelState.UNAVAILABLE
    assert [g["count"] for g in env.plane.model_config("m", 1)["instance_group"]] == [2]
    assert sorted(e["instance"] for e in env.events("load")) == ["m_0", "m_0", "m_1"]
    await env.all_exited(env.pids("m")[:1])
    # the same override again restarts nothing
    await env.plane.load_model("m", {"config": two})
    assert env.version("m", 1) is mv and len(env.pids()) == 3
    # without one, config.pbtxt counts again
    await env.plane.load_model("m", {})
    assert [g["count"] for g in env.plane.model_config("m", 1)["instance_group"]] == [1]
    assert len(env.live_pids("m")) == 1
    # an override loads a model whose config.pbtxt cannot be read at all
    env.write_file(path / "config.pbtxt", "this is { not a config")
    await env.plane.load_model("m", {"config": override(env, max_batch_size=4)})
    assert env.version("m", 1).config.max_batch_size == 4
    assert env.plane.model_metadata("m", 1)["inputs"] == [{"name": "IN0", "datatype": "UINT8", "shape": [-1, -1]}]


_POLL = "failed to load 'm', failed to poll from model repository"
BAD_LOADS: list[tuple[str, dict[str, Any], ErrorCode, str]] = [
    (
        "not a string",
        {"config": 5},
        ErrorCode.INVALID_ARGUMENT,
        "Config parameter 'config' must have string type for its value",
    ),
    ("not JSON", {"config": "{not json"}, ErrorCode.INVALID_ARGUMENT, f"{_POLL}: Invalid config override: "),
    (
        "not an object",
        {"config": "[1, 2]"},
        ErrorCode.INVALID_ARGUMENT,
        f"{_POLL}: Invalid config override: model configuration must be a JSON object",
    ),
    (
        "unknown field",
        {"config": '{"name": "m", "no_such_field": 1}'},
        ErrorCode.INVALID_ARGUMENT,
        f"{_POLL}: Invalid config override: invalid model configuration: ",
    ),
    (
        "bad enum",
        {"config": '{"name": "m", "instance_group": [{"kind": "KIND_QUANTUM"}]}'},
        ErrorCode.INVALID_ARGUMENT,
        f"{_POLL}: Invalid config override: invalid model configuration: ",
    ),
    (
        "files without config",
        {"file:1/model.py": "eA=="},
        ErrorCode.INVALID_ARGUMENT,
        "Load parameter 'config' must be specified for model file override",
    ),
    (
        "files not base64",
        {"config": "{}", "file:1/model.py": "not base64!"},
        ErrorCode.INVALID_ARGUMENT,
        "File parameter 'file:1/model.py' must be base64-encoded bytes",
    ),
    (
        "unknown parameter",
        {"weird": "1"},
        ErrorCode.INVALID_ARGUMENT,
        "Unrecognized load parameter 'weird' with type 'STRING'",
    ),
]


async def test_bad_load_parameters_are_refused_and_the_model_keeps_serving(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.plane.load_model("m", {})
    mv = env.version("m", 1)
    for what, params, code, message in BAD_LOADS:
        with pytest.raises(ServingError) as info:
            await env.plane.load_model("m", params)
        assert info.value.code is code, what
        assert info.value.message.startswith(message), (what, info.value.message)
    assert env.version("m", 1) is mv and mv.ready and len(env.pids()) == 1
    assert env.index()[("m", "1")] == {"name": "m", "version": "1", "state": "READY"}  # nothing was tried


BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("other name", {"name": "other"}, "model 'm': config name 'other' does not match the directory name"),
    ("negative batch", {"max_batch_size": -1}, "model 'm': max_batch_size must be >= 0"),
    ("unknown backend", {"backend": "cobol", "platform": ""}, "model 'm': backend 'cobol' is not supported"),
    (
        "missing version",
        {"version_policy": {"specific": {"versions": [7]}}},
        "model 'm': version(s) [7] named by version_policy do not exist",
    ),
    ("no dims", {"input": [{"name": "IN0", "data_type": "TYPE_UINT8"}]}, "model 'm': input 'IN0' has no dims"),
]


async def test_overrides_the_repository_refuses_keep_the_old_version_serving(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.plane.load_model("m", {})
    mv = env.version("m", 1)
    for what, changes, reason in BAD_CONFIGS:
        with pytest.raises(ServingError) as info:
            await env.plane.load_model("m", {"config": override(env, **changes)})
        # Triton's text (the reason is in the log and the repository index)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT, what
        assert info.value.message == "failed to load 'm', failed to poll from model repository", what
        assert env.version("m", 1) is mv and mv.ready and len(env.pids()) == 1, what
        assert env.index()[("m", "1")]["reason"] == f"reload failed, still serving: {reason}", what
        assert out_bytes(await env.infer("m", b"served")) == b"served", what


async def test_bad_unload_parameters_are_refused(env: ModelEnv) -> None:
    env.write(config("m"))
    await env.plane.load_model("m", {})
    for params, message in (
        ({"unload_dependents": "yes"}, "unload parameter 'unload_dependents' must be a boolean"),
        ({"force": True}, "unknown unload parameter 'force'"),
    ):
        with pytest.raises(ServingError) as info:
            await env.plane.unload_model("m", params)
        assert (info.value.code, info.value.message) == (ErrorCode.INVALID_ARGUMENT, message)
    assert env.version("m", 1).ready
    await env.plane.unload_model("m", {"unload_dependents": False})
    assert env.version("m", 1).state is ModelState.UNAVAILABLE


@pytest.mark.parametrize("mode", ["none", "poll"])
async def test_load_and_unload_need_explicit_mode(make_env: MakeEnv, mode: str) -> None:
    env = make_env(mode=mode)
    env.write(config("m"))
    for call in (env.plane.load_model("m", {}), env.plane.unload_model("m", {})):
        with pytest.raises(ServingError) as info:
            await call
        assert info.value.code is ErrorCode.UNAVAILABLE
        assert info.value.message == "explicit model load / unload is not allowed if polling is enabled"
    assert env.pids() == [] and env.models.registry.models == {}


async def test_lookups_answer_triton_errors_for_unknown_and_unready_models(env: ModelEnv) -> None:
    env.write(config("m"))
    env.write(config("broken", plans=[{"load": {"do": "fail", "message": "broken on purpose"}}]))
    path = env.write(config("garbled"))
    env.write_file(path / "config.pbtxt", "this is { not a config")
    await env.models.load("m")
    await env.models.load_all(["broken", "garbled", "ghost"])  # failures are recorded, not raised
    assert env.index()[("ghost", "")] == {
        "name": "ghost",
        "state": "UNAVAILABLE",
        "reason": "model 'ghost' is not in the model repository",
    }
    cases = [
        ("nope", -1, ErrorCode.INVALID_ARGUMENT, "Request for unknown model: 'nope' is not found"),
        ("m", 3, ErrorCode.NOT_FOUND, "Request for unknown model: 'm' version 3 is not found"),
        ("broken", -1, ErrorCode.NOT_FOUND, "Request for unknown model: 'broken' has no available versions"),
        ("broken", 1, ErrorCode.UNAVAILABLE, "Request for unknown model: 'broken' version 1 is not at ready state"),
        ("garbled", -1, ErrorCode.NOT_FOUND, "Request for unknown model: 'garbled' has no available versions"),
        ("garbled", 1, ErrorCode.NOT_FOUND, "Request for unknown model: 'garbled' version 1 is not found"),
        ("ghost", -1, ErrorCode.NOT_FOUND, "Request for unknown model: 'ghost' has no available versions"),
    ]
    for name, version, code, message in cases:
        for lookup in (env.plane.model_metadata, env.plane.model_config):
            with pytest.raises(ServingError) as info:
                lookup(name, version)
            assert (info.value.code, info.value.message) == (code, message), (name, version)
        with pytest.raises(ServingError) as info:
            await env.plane.model_ready(name, version)
        assert (info.value.code, info.value.message) == (code, message), (name, version)
        with pytest.raises(ServingError) as info:
            await env.infer(name, version=version)
        assert (info.value.code, info.value.message) == (code, message), (name, version)
        with pytest.raises(ServingError) as info:
            env.plane.statistics(name, version)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        if name == "m":
            assert info.value.message == "requested model version is not available for model 'm'"
        else:
            assert info.value.message == f"requested model '{name}' is not available"
    # a request the ready model refuses is checked against its configuration
    bad = env.request("m")
    bad.inputs = [InputTensor("IN0", "FP32", (1,), b"\0\0\0\0")]
    with pytest.raises(ServingError) as info:
        await env.plane.infer(bad)
    assert info.value.message == (
        "[request id: <id_unknown>] inference input 'IN0' data-type is 'FP32', but model 'm' expects 'UINT8'"
    )
    assert env.version("m", 1).stats.execution_count == 0


async def test_drain_stops_admission_and_lets_requests_in_flight_finish(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"infer": [{"hold": gate}]}]))
    await env.models.load("m")
    mv = env.version("m", 1)
    held = asyncio.ensure_future(env.infer("m", b"in flight"))
    await eventually(lambda: len(env.events("infer")) == 1, "the request to reach the worker")
    # what App.stop does: stop accepting, then drain
    env.plane.accepting = False
    assert not env.plane.ready()
    drain = asyncio.ensure_future(env.models.drain(5.0))
    with pytest.raises(ServingError) as info:
        await env.infer("m", b"late")
    assert (info.value.code, info.value.message) == (ErrorCode.UNAVAILABLE, "the server is shutting down")
    assert not held.done() and not drain.done()
    env.open_gate(gate)
    assert out_bytes(await held) == b"in flight"
    await drain
    # a request that got past the data plane before it closed is refused by the scheduler
    with pytest.raises(ServingError) as info:
        await submit(mv, env.request("m"))
    assert (info.value.code, info.value.message) == (ErrorCode.UNAVAILABLE, "the model is being unloaded")
    assert len(env.events("infer")) == 1
    await env.models.stop(2.0)
    await env.all_exited(env.pids())


async def test_statistics_count_requests_and_executions(env: ModelEnv) -> None:
    plans = [{"infer": [{}, {}, {}, {"errors": {"0": ["INVALID_ARGUMENT", "the model refused it"]}}]}]
    env.write(config("m", plans=plans))
    env.write(config("idle"))
    await env.models.load_all()
    for data in (b"a", b"bb", b"ccc"):
        out_bytes(await env.infer("m", data))
    (stats,) = env.plane.statistics("m", -1)
    assert (stats["name"], stats["version"]) == ("m", "1")
    assert (stats["inference_count"], stats["execution_count"]) == (3, 3)
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert (inference["success"]["count"], inference["fail"]["count"], inference["queue"]["count"]) == (3, 0, 3)
    assert inference["compute_infer"]["count"] == 3
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(1, 3)]
    with pytest.raises(BackendError) as info:
        await env.infer("m")
    assert (info.value.code, info.value.message) == (ErrorCode.INVALID_ARGUMENT, "the model refused it")
    (stats,) = env.plane.statistics("m", 1)
    inference = stats["inference_stats"]
    assert (inference["success"]["count"], inference["fail"]["count"]) == (3, 1)
    assert env.version("m", 1).stats.failures["BACKEND"] == 1
    # every ready model, or one
    assert [(s["name"], s["inference_count"]) for s in env.plane.statistics("", -1)] == [("idle", 0), ("m", 4)]


async def test_request_past_its_deadline_fails_naming_where_it_was(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"infer": [{"hold": gate}]}]))
    await env.models.load("m")
    late = env.request("m")
    late.parameters["timeout"] = 50_000  # microseconds
    with pytest.raises(ServingError) as info:
        await env.plane.infer(late)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert info.value.message == (
        "request for model 'm' version 1 did not complete within its deadline of 0.05 s "
        "(instance 'm_0' is still executing it)"
    )
    bad = env.request("m")
    bad.parameters["timeout"] = -1
    with pytest.raises(ServingError) as info:
        await env.plane.infer(bad)
    assert (info.value.code, info.value.message) == (
        ErrorCode.INVALID_ARGUMENT,
        "request parameter 'timeout' must be a non-negative integer",
    )
    # the worker's late answer is dropped; the instance serves the next request
    env.open_gate(gate)
    await eventually(lambda: len(env.events("answered")) == 1, "the late answer")
    assert out_bytes(await env.infer("m", b"next")) == b"next"
    stats = env.plane.statistics("m", 1)[0]["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (1, 1)


async def test_request_past_its_deadline_counts_as_rejected(env: ModelEnv) -> None:
    gate = env.gate()
    env.write(config("m", plans=[{"infer": [{"hold": gate}]}]))
    await env.models.load("m")
    late = env.request("m")
    late.parameters["timeout"] = 50_000
    with pytest.raises(ServingError):
        await env.plane.infer(late)
    failures = env.version("m", 1).stats.failures
    env.open_gate(gate)
    assert (failures["REJECTED"], failures["CANCELED"]) == (1, 0)
