"""Generated protobuf code, error codes, and the Triton JSON form of ModelConfig."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from shoal.proto import errors
from shoal.proto.config_json import config_from_json, config_to_json
from shoal.proto.gen import POOL, grpc_service_pb2, grpc_service_pb2_grpc, health_pb2, health_pb2_grpc, worker_pb2
from shoal.proto.gen import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "proto" / "gen"


def _generated_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    fresh = _generated_files(out)
    committed = _generated_files(GEN)
    expected = {
        "__init__.py",
        "model_config_pb2.py",
        "worker_pb2.pyi",
        "grpc_service_pb2.py",
        "grpc_service_pb2.pyi",
        "grpc_service_pb2_grpc.py",
        "grpc_service_pb2_grpc.pyi",
        "health_pb2.py",
        "health_pb2_grpc.py",
        "health_pb2_grpc.pyi",
    }
    assert expected <= set(fresh), sorted(expected - set(fresh))
    assert sorted(committed) == sorted(fresh), "proto/gen has stray or missing files: run scripts/gen_proto.sh"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"proto/gen is stale ({stale}): run scripts/gen_proto.sh"


def test_generator_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    first = _generated_files(out)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    assert _generated_files(out) == first


def test_error_codes_match_worker_proto() -> None:
    proto_codes = {v.name: v.number for v in worker_pb2.DESCRIPTOR.enum_types_by_name["ErrorCode"].values}
    py_codes = {c.name: c.value for c in errors.ErrorCode}
    assert py_codes == proto_codes


def test_model_config_field_numbers_match_triton() -> None:
    # Spot check of protocol facts from Triton's model_config.proto.
    fields = {f.name: f.number for f in mc.ModelConfig.DESCRIPTOR.fields}
    assert fields == {
        "name": 1,
        "platform": 2,
        "backend": 17,
        "runtime": 25,
        "version_policy": 3,
        "max_batch_size": 4,
        "input": 5,
        "output": 6,
        "batch_input": 20,
        "batch_output": 21,
        "optimization": 12,
        "dynamic_batching": 11,
        "sequence_batching": 13,
        "ensemble_scheduling": 15,
        "instance_group": 7,
        "default_model_filename": 8,
        "cc_model_filenames": 9,
        "metric_tags": 10,
        "parameters": 14,
        "model_warmup": 16,
        "model_operations": 18,
        "model_transaction_policy": 19,
        "model_repository_agents": 23,
        "response_cache": 24,
        "model_metrics": 26,
    }
    assert mc.ModelConfig.DESCRIPTOR.full_name == "inference.ModelConfig"
    assert {f.name: f.number for f in mc.ModelInput.DESCRIPTOR.fields} == {
        "name": 1,
        "data_type": 2,
        "format": 3,
        "dims": 4,
        "reshape": 5,
        "is_shape_tensor": 6,
        "allow_ragged_batch": 7,
        "optional": 8,
        "is_non_linear_format_io": 9,
    }
    assert {f.name: f.number for f in mc.ModelInstanceGroup.DESCRIPTOR.fields} == {
        "name": 1,
        "kind": 4,
        "count": 2,
        "rate_limiter": 6,
        "gpus": 3,
        "secondary_devices": 8,
        "profile": 5,
        "passive": 7,
        "host_policy": 9,
    }
    assert mc.DataType.Value("TYPE_BF16") == 14
    assert mc.ModelInstanceGroup.KIND_MODEL == 3


def _sample_config() -> mc.ModelConfig:
    cfg = mc.ModelConfig(name="simple", max_batch_size=8)
    cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[-1, 16])
    inp1 = cfg.input.add(name="INPUT1", data_type=mc.TYPE_INT64, dims=[1])
    inp1.reshape.SetInParent()  # reshape: { shape: [] }
    out = cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[16])
    out.reshape.shape.extend([4, 4])
    cfg.version_policy.specific.versions.extend([1, 3])
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend([4, 8])
    db.max_queue_delay_microseconds = 100
    db.priority_levels = 2
    db.default_priority_level = 1
    db.default_queue_policy.default_timeout_microseconds = 5000
    db.priority_queue_policy[1].default_timeout_microseconds = 7000
    db.priority_queue_policy[1].timeout_action = mc.ModelQueuePolicy.DELAY
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=2)
    warm = cfg.model_warmup.add(name="w", batch_size=1)
    warm.inputs["INPUT0"].data_type = mc.TYPE_FP32
    warm.inputs["INPUT0"].dims.extend([16])
    warm.inputs["INPUT0"].zero_data = True
    cfg.parameters["k"].string_value = "v"
    return cfg


def test_config_to_json_int64_fields_are_numbers() -> None:
    js = config_to_json(_sample_config())
    json.dumps(js)  # serializable as is
    inputs = js["input"]
    assert isinstance(inputs, list)
    assert inputs[0]["dims"] == [-1, 16]
    assert inputs[1]["dims"] == [1]
    assert inputs[1]["reshape"] == {"shape": []}
    outputs = js["output"]
    assert isinstance(outputs, list)
    assert outputs[0]["reshape"] == {"shape": [4, 4]}
    assert js["version_policy"] == {"specific": {"versions": [1, 3]}}
    db = js["dynamic_batching"]
    assert isinstance(db, dict)
    assert db["max_queue_delay_microseconds"] == 100
    assert db["priority_levels"] == 2
    assert db["default_priority_level"] == 1
    assert db["preferred_batch_size"] == [4, 8]
    assert db["preserve_ordering"] is False
    assert db["default_queue_policy"]["default_timeout_microseconds"] == 5000
    # Map keys stay strings; the values' 64-bit fields become numbers.
    assert db["priority_queue_policy"] == {
        "1": {
            "timeout_action": "DELAY",
            "default_timeout_microseconds": 7000,
            "allow_timeout_override": False,
            "max_queue_size": 0,
        },
    }
    warmups = js["model_warmup"]
    assert isinstance(warmups, list)
    assert warmups[0]["inputs"]["INPUT0"]["dims"] == [16]
    assert warmups[0]["inputs"]["INPUT0"]["zero_data"] is True
    assert "random_data" not in warmups[0]["inputs"]["INPUT0"]  # oneof member not set


def test_config_to_json_enum_names_and_default_scalars() -> None:
    js = config_to_json(_sample_config())
    assert js["name"] == "simple"
    assert js["platform"] == ""
    assert js["backend"] == ""
    assert js["runtime"] == ""
    assert js["max_batch_size"] == 8
    assert js["default_model_filename"] == ""
    assert js["batch_input"] == []
    assert js["cc_model_filenames"] == {}
    assert js["parameters"] == {"k": {"string_value": "v"}}
    inputs = js["input"]
    assert isinstance(inputs, list)
    assert inputs[0]["data_type"] == "TYPE_FP32"
    assert inputs[0]["format"] == "FORMAT_NONE"
    assert inputs[0]["optional"] is False
    assert inputs[0]["is_shape_tensor"] is False
    assert inputs[0]["allow_ragged_batch"] is False
    groups = js["instance_group"]
    assert isinstance(groups, list)
    assert groups[0] == {
        "name": "",
        "kind": "KIND_CPU",
        "count": 2,
        "gpus": [],
        "secondary_devices": [],
        "profile": [],
        "passive": False,
        "host_policy": "",
    }
    # Unset message fields (presence) are not printed, as in Triton.
    assert "optimization" not in js
    assert "sequence_batching" not in js
    assert "response_cache" not in js


def test_config_to_json_sequence_and_ensemble() -> None:
    cfg = mc.ModelConfig(name="seq", max_batch_size=4)
    sb = cfg.sequence_batching
    sb.max_sequence_idle_microseconds = 1_000_000
    sb.oldest.max_queue_delay_microseconds = 250
    state = sb.state.add(input_name="in_s", output_name="out_s", data_type=mc.TYPE_FP32, dims=[-1, 2])
    init = state.initial_state.add(name="init", data_type=mc.TYPE_FP32, dims=[1, 2], zero_data=True)
    assert init.zero_data
    js = config_to_json(cfg)
    seq = js["sequence_batching"]
    assert isinstance(seq, dict)
    assert seq["max_sequence_idle_microseconds"] == 1_000_000
    assert seq["oldest"]["max_queue_delay_microseconds"] == 250
    assert seq["state"][0]["dims"] == [-1, 2]
    # Triton leaves these as strings (its fix-up looks in the wrong place); so do we.
    assert seq["state"][0]["initial_state"][0]["dims"] == ["1", "2"]

    ens = mc.ModelConfig(name="ens", platform="ensemble")
    ens.ensemble_scheduling.step.add(model_name="a", model_version=-1)
    ens.ensemble_scheduling.step.add(model_name="b", model_version=3)
    ejs = config_to_json(ens)
    sched = ejs["ensemble_scheduling"]
    assert isinstance(sched, dict)
    assert [s["model_version"] for s in sched["step"]] == [-1, 3]


def test_config_to_json_other_int64_stay_strings() -> None:
    cfg = mc.ModelConfig(name="m")
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU).secondary_devices.add(device_id=7)
    spec = cfg.optimization.cuda.graph_spec.add(batch_size=2)
    spec.input["x"].dim.extend([3, 4])
    js = config_to_json(cfg)
    groups = js["instance_group"]
    assert isinstance(groups, list)
    assert groups[0]["secondary_devices"] == [{"kind": "KIND_NVDLA", "device_id": "7"}]
    opt = js["optimization"]
    assert isinstance(opt, dict)
    assert opt["cuda"]["graph_spec"][0]["input"] == {"x": {"dim": ["3", "4"]}}


def test_config_to_json_empty_config() -> None:
    assert config_to_json(mc.ModelConfig()) == {}


def test_config_from_json_round_trip() -> None:
    cfg = _sample_config()
    js = config_to_json(cfg)
    back = config_from_json(json.loads(json.dumps(js)))
    assert back == cfg
    assert config_to_json(back) == js


def test_config_from_json_accepts_string_int64_and_enum_numbers() -> None:
    cfg = config_from_json(
        {
            "name": "m",
            "input": [{"name": "x", "data_type": 11, "dims": ["-1", "3"]}],
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        }
    )
    assert list(cfg.input[0].dims) == [-1, 3]
    assert cfg.input[0].data_type == mc.TYPE_FP32
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_config_from_json_unknown_field() -> None:
    with pytest.raises(errors.InvalidInput) as info:
        config_from_json({"name": "m", "max_batch_sise": 4})
    assert info.value.code is errors.ErrorCode.INVALID_ARGUMENT
    assert "max_batch_sise" in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    "bad",
    [
        {"input": [{"name": "x", "data_type": "TYPE_NOPE"}]},
        {"input": [{"name": "x", "dims": ["a"]}]},
        {"max_batch_size": "eight"},
        {"input": 3},
    ],
)
def test_config_from_json_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidInput, match="invalid model configuration"):
        config_from_json(bad)


def test_config_from_json_not_an_object() -> None:
    with pytest.raises(errors.InvalidInput, match="JSON object"):
        config_from_json([1, 2])  # type: ignore[arg-type]


def test_coexists_with_tritonclient_grpc() -> None:
    """Our generated modules use a private descriptor pool, so a process may also import
    tritonclient.grpc (which registers Triton's own model_config.proto)."""
    pytest.importorskip("tritonclient.grpc")
    code = (
        "import tritonclient.grpc\n"
        "from proto.gen import model_config_pb2\n"
        "from tritonclient.grpc import model_config_pb2 as theirs\n"
        "ours = model_config_pb2.ModelConfig(name='m', max_batch_size=4)\n"
        "t = theirs.ModelConfig(); t.ParseFromString(ours.SerializeToString())\n"
        "assert (t.name, t.max_batch_size) == ('m', 4)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)


def test_service_modules_use_private_pool() -> None:
    from google.protobuf import descriptor_pool

    for mod in (grpc_service_pb2, health_pb2):
        assert mod.DESCRIPTOR.pool is POOL
        try:  # the default pool may hold tritonclient's file of the same name, never ours
            assert descriptor_pool.Default().FindFileByName(mod.DESCRIPTOR.name) is not mod.DESCRIPTOR
        except KeyError:
            pass
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == (
        "inference.GRPCInferenceService"
    )


def test_health_proto_is_the_standard_one() -> None:
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert service.full_name == "grpc.health.v1.Health"
    check, watch = service.methods_by_name["Check"], service.methods_by_name["Watch"]
    assert (check.client_streaming, check.server_streaming) == (False, False)
    assert (watch.client_streaming, watch.server_streaming) == (False, True)
    assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"
    assert check.output_type.full_name == "grpc.health.v1.HealthCheckResponse"
    assert {f.name: f.number for f in health_pb2.HealthCheckRequest.DESCRIPTOR.fields} == {"service": 1}
    assert {f.name: f.number for f in health_pb2.HealthCheckResponse.DESCRIPTOR.fields} == {"status": 1}
    status = health_pb2.HealthCheckResponse.ServingStatus
    assert {name: status.Value(name) for name in status.keys()} == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
        "SERVICE_UNKNOWN": 3,
    }
    assert {"Check", "Watch"} <= set(vars(health_pb2_grpc.HealthServicer))


def test_model_infer_round_trip_with_tritonclient() -> None:
    """Bytes written by our ModelInferRequest/Response parse in tritonclient's generated classes
    (Triton's own grpc_service.proto), and the other way round."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import unknown_fields
    from tritonclient.grpc import service_pb2 as theirs

    ours = grpc_service_pb2.ModelInferRequest(model_name="simple", model_version="3", id="req-1")
    ours.parameters["sequence_id"].int64_param = 42
    ours.parameters["priority"].uint64_param = 2
    ours.parameters["custom"].double_param = 0.5
    ours.parameters["flag"].bool_param = True
    inp = ours.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    inp.parameters["shared_memory_region"].string_param = "r0"
    inp.parameters["shared_memory_byte_size"].int64_param = 16
    ours.inputs.add(name="INPUT1", datatype="INT32", shape=[2]).contents.int_contents.extend([-1, 7])
    ours.inputs.add(name="INPUT2", datatype="BYTES", shape=[1])
    ours.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 3
    ours.raw_input_contents.append(b"\x03\x00\x00\x00abc")

    t = theirs.ModelInferRequest()
    t.ParseFromString(ours.SerializeToString())
    assert (t.model_name, t.model_version, t.id) == ("simple", "3", "req-1")
    assert t.parameters["sequence_id"].int64_param == 42
    assert t.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert t.parameters["custom"].double_param == 0.5
    assert t.parameters["flag"].bool_param is True
    assert [(i.name, i.datatype, list(i.shape)) for i in t.inputs] == [
        ("INPUT0", "FP32", [1, 4]),
        ("INPUT1", "INT32", [2]),
        ("INPUT2", "BYTES", [1]),
    ]
    assert t.inputs[0].parameters["shared_memory_region"].string_param == "r0"
    assert list(t.inputs[1].contents.int_contents) == [-1, 7]
    assert t.outputs[0].parameters["classification"].int64_param == 3
    assert list(t.raw_input_contents) == [b"\x03\x00\x00\x00abc"]
    assert len(unknown_fields.UnknownFieldSet(t)) == 0
    assert t.SerializeToString(deterministic=True) == ours.SerializeToString(deterministic=True)
    back = grpc_service_pb2.ModelInferRequest.FromString(t.SerializeToString())
    assert back == ours

    resp = theirs.ModelInferResponse(model_name="simple", model_version="1", id="req-1")
    resp.parameters["triton_final_response"].bool_param = True
    out = resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 4])
    out.contents.fp32_contents.extend([1.0, 2.5])
    resp.raw_output_contents.extend([b"\x00" * 16, b""])
    stream = theirs.ModelStreamInferResponse(error_message="", infer_response=resp)
    mine = grpc_service_pb2.ModelStreamInferResponse.FromString(stream.SerializeToString())
    got = mine.infer_response
    assert (got.model_name, got.model_version, got.id) == ("simple", "1", "req-1")
    assert got.parameters["triton_final_response"].bool_param is True
    assert [(o.name, o.datatype, list(o.shape)) for o in got.outputs] == [("OUTPUT0", "FP32", [1, 4])]
    assert list(got.outputs[0].contents.fp32_contents) == [1.0, 2.5]
    assert list(got.raw_output_contents) == [b"\x00" * 16, b""]
    assert mine.SerializeToString(deterministic=True) == stream.SerializeToString(deterministic=True)

    # Messages that embed model_config.proto also cross over.
    cfg_resp = grpc_service_pb2.ModelConfigResponse()
    cfg_resp.config.CopyFrom(_sample_config())
    t_cfg = theirs.ModelConfigResponse.FromString(cfg_resp.SerializeToString())
    assert t_cfg.config.name == "simple" and t_cfg.config.max_batch_size == 8
    assert t_cfg.SerializeToString(deterministic=True) == cfg_resp.SerializeToString(deterministic=True)


class _RecordingChannel:
    """Stands in for a grpc.Channel: records the method path and kind of every callable a
    generated stub asks for."""

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def _make(self, kind: str) -> object:
        def factory(path: str, *args: object, **kwargs: object) -> str:
            self.methods[path] = kind
            return path

        return factory

    def __getattr__(self, kind: str) -> object:
        if kind in {"unary_unary", "unary_stream", "stream_unary", "stream_stream"}:
            return self._make(kind)
        raise AttributeError(kind)


def test_servicer_covers_every_tritonclient_rpc() -> None:
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2_grpc as theirs_grpc

    their_channel, our_channel = _RecordingChannel(), _RecordingChannel()
    theirs_grpc.GRPCInferenceServiceStub(their_channel)
    grpc_service_pb2_grpc.GRPCInferenceServiceStub(cast(Any, our_channel))
    assert their_channel.methods, "tritonclient's stub registered no methods"

    servicer_methods = {
        name for name in vars(grpc_service_pb2_grpc.GRPCInferenceServiceServicer) if not name.startswith("_")
    }
    for path, kind in their_channel.methods.items():
        service, _, name = path.lstrip("/").partition("/")
        assert service == "inference.GRPCInferenceService"
        assert name in servicer_methods, f"servicer lacks {name}"
        assert our_channel.methods.get(path) == kind, f"{path}: ours {our_channel.methods.get(path)}, theirs {kind}"
