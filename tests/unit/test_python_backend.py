"""The Python backend and Shoal's ``triton_python_backend_utils``."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends.base import Device, ModelSpec, WorkRequest
from shoal.workers.backends.python import PythonBackend, pb_utils

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "models"

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
{extra}
"""

HEADER = "import numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"


@pytest.fixture
def pb() -> ModuleType:
    return pb_utils()


def _spec(repo: Path, name: str, device: Device | None = None) -> ModelSpec:
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    return ModelSpec(
        name=name,
        version=1,
        config=config,
        repository=str(repo),
        model_dir=str(repo / name),
        version_dir=str(repo / name / "1"),
        instance_name=f"{name}_0",
        device=device or Device(),
    )


def _write_model(repo: Path, name: str, body: str, extra: str = "", filename: str = "model.py") -> Path:
    vdir = repo / name / "1"
    vdir.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, extra=extra))
    (vdir / filename).write_text(HEADER + textwrap.dedent(body))
    return vdir


@pytest.fixture
def loaded() -> Iterator[list[PythonBackend]]:
    backends: list[PythonBackend] = []
    yield backends
    for b in backends:
        b.close()


def _load(loaded: list[PythonBackend], repo: Path, name: str, device: Device | None = None) -> PythonBackend:
    backend = PythonBackend.load(_spec(repo, name, device))
    loaded.append(backend)
    return backend


def _req(i: int = 0, outputs: list[str] | None = None, **inputs: Any) -> WorkRequest:
    return WorkRequest(id=i, inputs=dict(inputs), requested_outputs=outputs or [])


# --------------------------------------------------------------------------- examples


def test_add_sub(loaded: list[PythonBackend]) -> None:
    backend = _load(loaded, EXAMPLES, "add_sub")
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    b = np.array([0.5, 0.5, 1, 1], dtype=np.float32)
    (resp,) = backend.execute([_req(INPUT0=a, INPUT1=b)])
    assert resp.error is None
    np.testing.assert_array_equal(resp.outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(resp.outputs["OUTPUT1"], a - b)
    assert resp.outputs["OUTPUT0"].dtype == np.float32


def test_add_sub_batch_and_requested_outputs(loaded: list[PythonBackend]) -> None:
    backend = _load(loaded, EXAMPLES, "add_sub")
    a = np.ones(4, dtype=np.float32)
    r1, r2 = backend.execute([_req(0, ["OUTPUT1"], INPUT0=a, INPUT1=a), _req(1, INPUT0=a * 3, INPUT1=a)])
    assert list(r1.outputs) == ["OUTPUT1"]
    np.testing.assert_array_equal(r1.outputs["OUTPUT1"], np.zeros(4))
    assert sorted(r2.outputs) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(r2.outputs["OUTPUT0"], a * 4)


def test_strings(loaded: list[PythonBackend]) -> None:
    backend = _load(loaded, EXAMPLES, "strings")
    data = np.array([[b"abc", b"", b"Hello World"], [b"x", b"\x00y", b"ok"]], dtype=np.object_)
    (resp,) = backend.execute([_req(INPUT0=data)])
    assert resp.error is None
    out = resp.outputs["OUTPUT0"]
    assert out.dtype == np.object_ and out.shape == (2, 3)
    assert out.tolist() == [[b"ABC", b"", b"HELLO WORLD"], [b"X", b"\x00Y", b"OK"]]
    np.testing.assert_array_equal(resp.outputs["OUTPUT1"], np.array([[3, 0, 11], [1, 2, 2]], dtype=np.int32))
    assert resp.outputs["OUTPUT1"].dtype == np.int32


def test_identity_output_is_the_input(loaded: list[PythonBackend]) -> None:
    """No copy for an output that is an input: the worker writes outputs while inputs are
    still valid (the identity over shared memory is one copy, not two)."""
    backend = _load(loaded, EXAMPLES, "identity_fp32")
    x = np.arange(10, dtype=np.float32)
    (resp,) = backend.execute([_req(INPUT0=x)])
    out = resp.outputs["OUTPUT0"]
    np.testing.assert_array_equal(out, x)
    assert np.shares_memory(out, x)


def test_initialize_args(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path,
        "argsy",
        """
        class TritonPythonModel:
            def initialize(self, args):
                self.args = args

            def execute(self, requests):
                return [pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT0", np.zeros(1, np.float32))],
                    parameters={"echo": r.parameters(), "flags": r.flags(), "id": r.request_id(),
                                "corr": r.correlation_id(), "model": r.model_name(),
                                "wanted": r.requested_output_names()})
                        for r in requests]
        """,
    )
    backend = _load(loaded, tmp_path, "argsy", Device("GPU", 1))
    args = backend._model.args
    assert all(isinstance(v, str) for v in args.values())
    assert args["model_name"] == "argsy" and args["model_version"] == "1"
    assert args["model_repository"] == str(tmp_path / "argsy")
    assert args["model_instance_kind"] == "GPU" and args["model_instance_device_id"] == "1"
    assert args["model_instance_name"] == "argsy_0"
    config = json.loads(args["model_config"])
    assert config["name"] == "argsy" and config["input"][0]["dims"] == [-1]
    req = WorkRequest(
        id=0,
        inputs={"INPUT0": np.zeros(1, np.float32)},
        requested_outputs=[],
        parameters={"p": 1},
        request_id="r7",
        correlation_id=42,
        flags=1,
    )
    (resp,) = backend.execute([req])
    assert isinstance(resp.parameters, str)  # the model's JSON text, passed on unparsed
    assert json.loads(resp.parameters) == {
        "echo": '{"p": 1}',
        "flags": 1,
        "id": "r7",
        "corr": 42,
        "model": "argsy",
        "wanted": ["OUTPUT0"],
    }


def test_cpu_device_id_is_zero(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path, "cpu", "class TritonPythonModel:\n    def initialize(self, args):\n        self.args = args\n"
    )
    assert _load(loaded, tmp_path, "cpu")._model.args["model_instance_device_id"] == "0"


# --------------------------------------------------------------------------- errors


def test_execute_raises(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path,
        "boom",
        """
        class TritonPythonModel:
            def execute(self, requests):
                raise ValueError("bad things")
        """,
    )
    backend = _load(loaded, tmp_path, "boom")
    with pytest.raises(ServingError) as info:
        backend.execute([_req(INPUT0=np.zeros(1, np.float32))])
    assert info.value.code == ErrorCode.INTERNAL
    assert info.value.message == "ValueError: bad things"


def test_execute_raises_triton_model_exception(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path,
        "tme",
        """
        class TritonPythonModel:
            def execute(self, requests):
                raise pb_utils.TritonModelException("no way")
        """,
    )
    with pytest.raises(ServingError, match="^TritonModelException: no way$"):
        _load(loaded, tmp_path, "tme").execute([_req(INPUT0=np.zeros(1, np.float32))])


def test_wrong_number_of_responses(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path,
        "short",
        """
        class TritonPythonModel:
            def execute(self, requests):
                return []
        """,
    )
    backend = _load(loaded, tmp_path, "short")
    with pytest.raises(ServingError) as info:
        backend.execute([_req(INPUT0=np.zeros(1, np.float32))])
    assert info.value.code == ErrorCode.INTERNAL
    assert "'short'" in info.value.message and "0 responses for 1 requests" in info.value.message


def test_triton_error_response(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(
        tmp_path,
        "picky",
        """
        class TritonPythonModel:
            def execute(self, requests):
                out = []
                for r in requests:
                    x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                    if x.sum() < 0:
                        err = pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)
                        out.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
                    elif x.sum() > 100:
                        out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("too big")))
                    else:
                        out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
                return out
        """,
    )
    backend = _load(loaded, tmp_path, "picky")
    bad, big, good = backend.execute(
        [
            _req(0, INPUT0=np.array([-1.0], np.float32)),
            _req(1, INPUT0=np.array([1000.0], np.float32)),
            _req(2, INPUT0=np.array([2.0], np.float32)),
        ]
    )
    assert bad.error is not None and bad.error.code == ErrorCode.INVALID_ARGUMENT
    assert bad.error.message == "negative input" and bad.outputs == {}
    assert big.error is not None and big.error.code == ErrorCode.INTERNAL
    assert good.error is None and good.outputs["OUTPUT0"].tolist() == [4.0]


def test_initialize_raises(tmp_path: Path) -> None:
    _write_model(
        tmp_path,
        "badinit",
        """
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("cannot start")
        """,
    )
    before = set(sys.modules)
    with pytest.raises(ServingError) as info:
        PythonBackend.load(_spec(tmp_path, "badinit"))
    assert info.value.code == ErrorCode.INTERNAL
    assert "'badinit'" in info.value.message and "RuntimeError: cannot start" in info.value.message
    assert not {m for m in set(sys.modules) - before if m.startswith("_shoal_python_model")}
    assert str(tmp_path / "badinit" / "1") not in sys.path


def test_import_error(tmp_path: Path) -> None:
    _write_model(tmp_path, "syntax", "def broken(:\n")
    with pytest.raises(ServingError, match="'syntax'.*SyntaxError"):
        PythonBackend.load(_spec(tmp_path, "syntax"))


def test_no_model_class(tmp_path: Path) -> None:
    _write_model(tmp_path, "noclass", "X = 1\n")
    with pytest.raises(ServingError, match="TritonPythonModel"):
        PythonBackend.load(_spec(tmp_path, "noclass"))


def test_missing_model_file(tmp_path: Path) -> None:
    (tmp_path / "ghost" / "1").mkdir(parents=True)
    (tmp_path / "ghost" / "config.pbtxt").write_text(CONFIG.format(name="ghost", extra=""))
    with pytest.raises(ServingError) as info:
        PythonBackend.load(_spec(tmp_path, "ghost"))
    assert "'ghost'" in info.value.message and "'ghost/1/model.py'" in info.value.message
    assert str(tmp_path) not in info.value.message


_DECOUPLED = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            try:
                sender.send(pb_utils.InferenceResponse([]))
            except pb_utils.TritonModelException as exc:
                sender.after_final = str(exc)
        return self.returns

    returns = None
"""


def test_decoupled_responses_go_through_the_sender(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    _write_model(tmp_path, "dec", _DECOUPLED, extra="model_transaction_policy { decoupled: true }")
    backend = PythonBackend.load(_spec(tmp_path, "dec"))
    loaded.append(backend)
    sent: list[tuple[Any, bool]] = []
    req = WorkRequest(id=0, inputs={"INPUT0": np.ones(2, np.float32)}, requested_outputs=[])
    req.send = lambda resp, final: sent.append((resp, final))
    assert backend.execute([req]) == []
    (first, f1), (second, f2) = sent
    assert not f1 and f2 and second is None
    np.testing.assert_array_equal(first.outputs["OUTPUT0"], np.full(2, 2, np.float32))
    model = backend._model
    model.returns = []  # anything but None is an error, with Triton's text
    with pytest.raises(ServingError, match="is using the decoupled mode and the execute function must return None"):
        backend.execute([req])


def test_sender_refuses_a_send_after_the_final_one(pb: ModuleType) -> None:
    got: list[Any] = []
    req = pb.InferenceRequest(model_name="m")
    req._send = lambda resp, final: got.append(final)
    sender = req.get_response_sender()
    assert req.get_response_sender() is sender
    with pytest.raises(pb.TritonModelException, match="must be provided"):
        sender.send(None, 0)
    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb.TritonModelException, match="Response sender has been closed"):
        sender.send(pb.InferenceResponse([]))
    assert got == [True]


# --------------------------------------------------------------------------- loading


def test_default_model_filename_and_sibling_module(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    vdir = _write_model(
        tmp_path,
        "custom",
        """
        import shoal_test_sibling_helper as helper

        class TritonPythonModel:
            def execute(self, requests):
                return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.full(1, helper.VALUE, np.float32))])
                        for r in requests]
        """,
        extra='default_model_filename: "main.py"',
        filename="main.py",
    )
    (vdir / "shoal_test_sibling_helper.py").write_text("VALUE = 7.0\n")
    try:
        (resp,) = _load(loaded, tmp_path, "custom").execute([_req(INPUT0=np.zeros(1, np.float32))])
        assert resp.outputs["OUTPUT0"].tolist() == [7.0]
        assert not (vdir / "__pycache__").exists()
    finally:
        sys.modules.pop("shoal_test_sibling_helper", None)


def test_two_models_same_file_name(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    for name, factor in (("one", 1), ("two", 2)):
        _write_model(
            tmp_path,
            name,
            f"""
            FACTOR = {factor}

            class TritonPythonModel:
                def execute(self, requests):
                    return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0",
                            pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * FACTOR)])
                            for r in requests]
            """,
        )
    one = _load(loaded, tmp_path, "one")
    two = _load(loaded, tmp_path, "two")
    x = np.array([3.0], np.float32)
    assert one.execute([_req(INPUT0=x)])[0].outputs["OUTPUT0"].tolist() == [3.0]
    assert two.execute([_req(INPUT0=x)])[0].outputs["OUTPUT0"].tolist() == [6.0]


def test_close_calls_finalize_once_and_cleans_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_model(
        tmp_path,
        "fin",
        """
        CALLS = []

        class TritonPythonModel:
            def finalize(self):
                CALLS.append(1)
                raise RuntimeError("finalize failed")
        """,
    )
    backend = PythonBackend.load(_spec(tmp_path, "fin"))
    module = backend._module
    with caplog.at_level(logging.ERROR):
        backend.close()
        backend.close()
    assert module.CALLS == [1]
    assert "finalize raised" in caplog.text
    assert module.__name__ not in sys.modules
    assert str(tmp_path / "fin" / "1") not in sys.path
    with pytest.raises(ServingError):
        backend.execute([_req(INPUT0=np.zeros(1, np.float32))])


# --------------------------------------------------------------------------- pb_utils


def test_type_helpers(pb: ModuleType) -> None:
    assert pb.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb.triton_string_to_numpy("TYPE_BOOL") is np.bool_
    assert pb.numpy_to_triton_type(np.float32) == 11
    assert pb.numpy_to_triton_type(np.dtype("int64")) == 9
    assert pb.numpy_to_triton_type(np.object_) == 13
    assert pb.numpy_to_triton_type(np.bytes_) == 13
    assert pb.numpy_to_triton_type(np.complex64) is None
    assert pb.triton_to_numpy_type(1) is np.bool_
    assert pb.triton_to_numpy_type(13) is np.object_
    assert pb.triton_to_numpy_type(99) is None


def test_config_helpers(pb: ModuleType) -> None:
    config = {"input": [{"name": "A", "data_type": "TYPE_FP32"}], "output": [{"name": "B"}]}
    assert pb.get_input_config_by_name(config, "A")["data_type"] == "TYPE_FP32"
    assert pb.get_input_config_by_name(config, "B") is None
    assert pb.get_output_config_by_name(config, "B") == {"name": "B"}
    assert pb.get_output_config_by_name({}, "B") is None
    assert not pb.using_decoupled_model_transaction_policy(config)
    assert pb.using_decoupled_model_transaction_policy({"model_transaction_policy": {"decoupled": True}})


def test_tensor(pb: ModuleType) -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    t = pb.Tensor("X", arr)
    assert t.name() == "X" and t.as_numpy() is arr and t.is_cpu()
    assert t.shape() == [2, 3] and t.triton_dtype() == 8
    assert pb.Tensor("S", np.array([b"a"], dtype=np.object_)).triton_dtype() == 13
    with pytest.raises(pb.TritonModelException, match="np.object_"):
        pb.Tensor("U", np.array(["a"]))
    back = pb.Tensor.from_dlpack("Y", t.to_dlpack())
    assert back.name() == "Y" and back.as_numpy().tolist() == arr.tolist()
    assert np.shares_memory(back.as_numpy(), arr)
    assert pb.Tensor.from_dlpack("Z", arr).as_numpy().tolist() == arr.tolist()
    with pytest.raises(pb.TritonModelException, match="DLPack"):
        pb.Tensor("S", np.array([b"a"], dtype=np.object_)).to_dlpack()


def test_tensor_from_gpu_dlpack_needs_cupy(pb: ModuleType) -> None:
    """GPU DLPack tensors are wrapped with CuPy (GPU machines: tests/gpu); without CuPy the
    model gets a clear error, and unknown device types are refused."""
    pytest.importorskip("numpy")

    class Fake:
        def __init__(self, device: int) -> None:
            self.device = device

        def __dlpack__(self, **_: Any) -> object:
            raise AssertionError("must not be consumed")

        def __dlpack_device__(self) -> tuple[int, int]:
            return (self.device, 0)

    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(pb.TritonModelException, match="CuPy"):
            pb.Tensor.from_dlpack("G", Fake(2))
    with pytest.raises(pb.TritonModelException, match="device type 4 is not supported"):
        pb.Tensor.from_dlpack("G", Fake(4))


def test_request_response_and_errors(pb: ModuleType) -> None:
    t = pb.Tensor("A", np.zeros(2, np.float32))
    req = pb.InferenceRequest(model_name="m", inputs=[t], requested_output_names=["B"], parameters={"k": "v"})
    assert pb.get_input_tensor_by_name(req, "A") is t and pb.get_input_tensor_by_name(req, "Q") is None
    assert req.requested_output_names() == ["B"] and json.loads(req.parameters()) == {"k": "v"}
    assert req.flags() == 0 and req.correlation_id() == 0 and req.request_id() == "" and req.model_name() == "m"
    with pytest.raises(pb.TritonModelException, match="BLS"):
        req.exec()
    with pytest.raises(pb.TritonModelException, match="decoupled"):
        req.get_response_sender()
    resp = pb.InferenceResponse(output_tensors=[t])
    assert not resp.has_error() and resp.error() is None and pb.get_output_tensor_by_name(resp, "A") is t
    assert pb.get_output_tensor_by_name(resp, "B") is None and resp.parameters() == "{}"
    err = pb.TritonError("nope", pb.TritonError.NOT_FOUND)
    assert err.message() == "nope" and err.code() == 2 and str(err) == "nope"
    assert pb.TritonError("x").code() == pb.TritonError.INTERNAL
    assert pb.InferenceResponse([], error=err).has_error()
    with pytest.raises(pb.TritonModelException):
        pb.InferenceResponse(output_tensors=t)
    assert (pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END) == (1, 2)
    assert pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL == 1
    codes = [
        pb.TritonError.UNKNOWN,
        pb.TritonError.INTERNAL,
        pb.TritonError.NOT_FOUND,
        pb.TritonError.INVALID_ARG,
        pb.TritonError.UNAVAILABLE,
        pb.TritonError.UNSUPPORTED,
        pb.TritonError.ALREADY_EXISTS,
        pb.TritonError.CANCELLED,
    ]
    assert codes == list(range(8))


def test_bytes_serialization(pb: ModuleType) -> None:
    arr = np.array([b"ab", b"", "é"], dtype=np.object_)
    data = pb.serialize_byte_tensor(arr)
    assert data == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"
    assert pb.deserialize_bytes_tensor(data).tolist() == [b"ab", b"", "é".encode()]


def test_logger(pb: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="shoal.python_model"):
        pb.Logger.log_info("i-msg")
        pb.Logger.log_warn("w-msg")
        pb.Logger.log_error("e-msg")
        pb.Logger.log_verbose("v-msg")
        pb.Logger.log("x-msg", pb.Logger.ERROR)
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels == {
        "i-msg": logging.INFO,
        "w-msg": logging.WARNING,
        "e-msg": logging.ERROR,
        "v-msg": logging.DEBUG,
        "x-msg": logging.ERROR,
    }


def test_model_config_autocomplete(pb: ModuleType) -> None:
    cfg = pb.ModelConfig(
        json.dumps(
            {
                "name": "m",
                "max_batch_size": 0,
                "input": [{"name": "A", "data_type": "TYPE_INVALID", "dims": []}],
                "output": [],
            }
        )
    )
    cfg.set_max_batch_size(4)
    assert cfg.max_batch_size() == 4
    with pytest.raises(ValueError, match="max_batch_size"):
        cfg.set_max_batch_size(2)
    cfg.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [3]})
    cfg.add_input({"name": "B", "data_type": "TYPE_INT32", "dims": [-1], "optional": True})
    cfg.add_output({"name": "C", "data_type": "TYPE_FP32", "dims": [3]})
    with pytest.raises(ValueError, match="datatype"):
        cfg.add_input({"name": "A", "data_type": "TYPE_INT8", "dims": [3]})
    with pytest.raises(ValueError, match="dims"):
        cfg.add_output({"name": "C", "data_type": "TYPE_FP32", "dims": [4]})
    with pytest.raises(ValueError, match="missing 'dims'"):
        cfg.add_output({"name": "D", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="other than"):
        cfg.add_output({"name": "D", "data_type": "TYPE_FP32", "dims": [1], "optional": True})
    cfg.set_dynamic_batching()
    cfg.set_model_transaction_policy({"decoupled": False})
    d = cfg.as_dict()
    assert d["input"] == [
        {"name": "A", "data_type": "TYPE_FP32", "dims": [3]},
        {"name": "B", "data_type": "TYPE_INT32", "dims": [-1], "optional": True},
    ]
    assert d["output"] == [{"name": "C", "data_type": "TYPE_FP32", "dims": [3]}]
    assert d["dynamic_batching"] == {} and d["model_transaction_policy"] == {"decoupled": False}
    seq = pb.ModelConfig({"name": "s", "sequence_batching": {}})
    with pytest.raises(ValueError, match="sequence_batching"):
        seq.set_dynamic_batching()


def test_pb_utils_has_python_backends_names(pb: ModuleType) -> None:
    """Names python_backend's pb_utils exposes that models use: memory kinds, metric kinds,
    request flags and the response iterator of a decoupled BLS call."""
    assert pb.MemoryType.TRITONSERVER_MEMORY_GPU == pb.TRITONSERVER_MEMORY_GPU
    assert pb.MemoryType.TRITONSERVER_MEMORY_CPU == pb.TRITONSERVER_MEMORY_CPU
    pm = pb.PreferredMemory(pb.MemoryType.TRITONSERVER_MEMORY_GPU, 0)
    assert pm.preferred_memory_type == pb.TRITONSERVER_MEMORY_GPU
    assert [pb.MetricKind.COUNTER, pb.MetricKind.GAUGE, pb.MetricKind.HISTOGRAM] == [
        pb.MetricFamily.COUNTER,
        pb.MetricFamily.GAUGE,
        pb.MetricFamily.HISTOGRAM,
    ]
    req = pb.InferenceRequest(model_name="m", inputs=[], requested_output_names=[])
    req.set_flags(pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
    assert req.flags() == pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    cancelled: list[bool] = []
    it = pb.ResponseIterator(iter([1, 2, 3]), lambda: cancelled.append(True))
    assert next(it) == 1
    it.cancel()
    it.cancel()
    assert cancelled == [True]
    for name in ("MemoryType", "MetricKind", "ResponseIterator", "TRITONSERVER_MEMORY_GPU"):
        assert name in pb.__all__


def test_a_received_request_has_the_attributes_of_a_constructed_one(pb: ModuleType) -> None:
    """``InferenceRequest._received`` (the worker's way to build what ``execute`` gets) sets
    every attribute ``__init__`` sets: an attribute added to one must be added to the other."""
    t = pb.Tensor("INPUT0", np.zeros(2, np.float32))
    made = pb.InferenceRequest(model_name="m", inputs=[t], requested_output_names=["OUTPUT0"])
    got = pb.InferenceRequest._received("m", -1, [t], ["OUTPUT0"], "", 0, 0, "{}", pb.InferenceTrace())
    assert set(vars(got)) == set(vars(made))
    for name in vars(made):
        if name not in ("_trace", "_inputs", "_requested"):
            assert getattr(got, name) == getattr(made, name), name
    assert got.inputs() == made.inputs() and got.requested_output_names() == made.requested_output_names()


def test_execute_sees_the_request_as_sent(tmp_path: Path, loaded: list[PythonBackend]) -> None:
    """What a model reads off a request: its id, correlation id, flags, parameters (from the
    wire's JSON text or a dict), requested outputs (all of them when none was named) and
    trace; an untraced request's trace is empty."""
    _write_model(
        tmp_path,
        "echo_meta",
        """
        import json

        def meta(r):
            seen = {"id": r.request_id(), "corr": r.correlation_id(), "flags": r.flags(),
                    "params": json.loads(r.parameters()), "outputs": r.requested_output_names(),
                    "trace": r.trace()._id, "model": r.model_name(), "version": r.model_version()}
            return pb_utils.Tensor("OUTPUT0", np.array([json.dumps(seen).encode()], dtype=np.object_))

        class TritonPythonModel:
            def execute(self, requests):
                return [pb_utils.InferenceResponse(output_tensors=[meta(r)]) for r in requests]
        """,
    )
    backend = _load(loaded, tmp_path, "echo_meta")
    x = np.zeros(1, np.float32)
    reqs = [
        WorkRequest(
            id=0,
            inputs={"INPUT0": x},
            requested_outputs=[],
            parameters='{"k": 1}',
            request_id="a",
            correlation_id="seq-7",
            flags=1,
            trace_id=12,
        ),  # fmt: skip
        WorkRequest(id=1, inputs={"INPUT0": x}, requested_outputs=["OUTPUT0"], parameters={"s": "v"}),
        WorkRequest(id=2, inputs={"INPUT0": x}, requested_outputs=[], parameters=""),
    ]
    metas = [json.loads(r.outputs["OUTPUT0"][0]) for r in backend.execute(reqs)]
    assert metas[0] == {"id": "a", "corr": "seq-7", "flags": 1, "params": {"k": 1}, "outputs": ["OUTPUT0"],
                        "trace": 12, "model": "echo_meta", "version": 1}  # fmt: skip
    assert metas[1]["params"] == {"s": "v"} and metas[1]["outputs"] == ["OUTPUT0"] and metas[1]["trace"] == 0
    assert metas[2]["params"] == {} and metas[2]["corr"] == 0 and metas[2]["id"] == ""
