"""The onnxruntime backend against the generated example models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from google.protobuf import text_format

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from shoal.proto.errors import ErrorCode, ServingError  # noqa: E402
from shoal.proto.gen import model_config_pb2 as mc  # noqa: E402
from shoal.workers.backends.base import Device, ModelSpec, WorkRequest  # noqa: E402
from shoal.workers.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _load_make_examples() -> ModuleType:
    name = "shoal_make_examples"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_examples = _load_make_examples()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    written = make_examples.make_examples(root)
    assert (root / "simple_onnx" / "1" / "model.onnx") in written
    return root


def _spec(repo: Path, name: str, config: mc.ModelConfig | None = None, device: Device | None = None) -> ModelSpec:
    if config is None:
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


def _config(name: str, text: str) -> mc.ModelConfig:
    return text_format.Parse(f'name: "{name}"\nbackend: "onnxruntime"\n{text}', mc.ModelConfig())


def test_make_examples_is_idempotent(repo: Path) -> None:
    assert make_examples.make_examples(repo) == []
    forced = make_examples.make_examples(repo, force=True)
    assert len(forced) == len(make_examples.EXAMPLES)
    assert all(p.name == "model.onnx" for p in forced)


def test_simple_single_request(repo: Path) -> None:
    backend = OnnxRuntimeBackend.load(_spec(repo, "simple_onnx"))
    try:
        assert backend.batching
        assert backend.output_names() == ["OUTPUT0", "OUTPUT1"]
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        [resp] = backend.execute([WorkRequest(id=1, inputs={"INPUT0": a, "INPUT1": b}, requested_outputs=[])])
        assert resp.error is None
        np.testing.assert_array_equal(resp.outputs["OUTPUT0"], a + b)
        np.testing.assert_array_equal(resp.outputs["OUTPUT1"], a - b)
        [resp] = backend.execute([WorkRequest(id=2, inputs={"INPUT0": a, "INPUT1": b}, requested_outputs=["OUTPUT1"])])
        assert list(resp.outputs) == ["OUTPUT1"]
    finally:
        backend.close()
        backend.close()


def test_simple_batch_of_three(repo: Path) -> None:
    backend = OnnxRuntimeBackend.load(_spec(repo, "simple_onnx"))
    rng = np.random.default_rng(0)
    requests = []
    for i, n in enumerate((1, 3, 2)):
        a = rng.integers(-100, 100, (n, 16), dtype=np.int32)
        b = rng.integers(-100, 100, (n, 16), dtype=np.int32)
        wanted = ["OUTPUT0"] if i == 1 else []
        requests.append(WorkRequest(id=i, inputs={"INPUT0": a, "INPUT1": b}, requested_outputs=wanted))
    responses = backend.execute(requests)
    assert len(responses) == 3
    for req, resp in zip(requests, responses, strict=True):
        a, b = req.inputs["INPUT0"], req.inputs["INPUT1"]
        assert resp.error is None
        np.testing.assert_array_equal(resp.outputs["OUTPUT0"], a + b)
        if req.requested_outputs:
            assert list(resp.outputs) == ["OUTPUT0"]
        else:
            np.testing.assert_array_equal(resp.outputs["OUTPUT1"], a - b)


def test_identity_variable_length(repo: Path) -> None:
    backend = OnnxRuntimeBackend.load(_spec(repo, "identity_onnx"))
    x = np.linspace(0, 1, 14, dtype=np.float32).reshape(2, 7)
    y = np.linspace(1, 2, 7, dtype=np.float32).reshape(1, 7)
    r1, r2 = backend.execute(
        [WorkRequest(id=i, inputs={"INPUT0": v}, requested_outputs=[]) for i, v in enumerate((x, y))]
    )
    np.testing.assert_array_equal(r1.outputs["OUTPUT0"], x)
    np.testing.assert_array_equal(r2.outputs["OUTPUT0"], y)


def test_mlp_batch_matches_single(repo: Path) -> None:
    backend = OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx"))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in (2, 1, 4)]
    batched = backend.execute([WorkRequest(id=i, inputs={"INPUT0": x}, requested_outputs=[]) for i, x in enumerate(xs)])
    for x, resp in zip(xs, batched, strict=True):
        [alone] = backend.execute([WorkRequest(id=9, inputs={"INPUT0": x}, requested_outputs=[])])
        assert resp.outputs["OUTPUT0"].shape == (x.shape[0], 16)
        np.testing.assert_allclose(resp.outputs["OUTPUT0"], alone.outputs["OUTPUT0"], rtol=1e-5, atol=1e-5)


def test_dtype_mismatch_names_tensor(repo: Path) -> None:
    config = _config(
        "simple_onnx",
        """max_batch_size: 8
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [16] },
                { name: "INPUT1" data_type: TYPE_INT32 dims: [16] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [16] } ]""",
    )
    with pytest.raises(ServingError) as info:
        OnnxRuntimeBackend.load(_spec(repo, "simple_onnx", config))
    err = info.value
    assert err.code == ErrorCode.INVALID_ARGUMENT
    assert "INPUT0" in err.message and "TYPE_FP32" in err.message and "TYPE_INT32" in err.message


def test_shape_mismatch(repo: Path) -> None:
    config = _config(
        "simple_onnx",
        """max_batch_size: 8
        input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [8] },
                { name: "INPUT1" data_type: TYPE_INT32 dims: [16] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [16] } ]""",
    )
    with pytest.raises(ServingError, match="INPUT0") as info:
        OnnxRuntimeBackend.load(_spec(repo, "simple_onnx", config))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    config.max_batch_size = 0  # rank 1 in the config, rank 2 in the model
    with pytest.raises(ServingError, match="rank"):
        OnnxRuntimeBackend.load(_spec(repo, "simple_onnx", config))


def test_unknown_output(repo: Path) -> None:
    config = _config(
        "identity_onnx",
        """max_batch_size: 8
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [-1] } ]
        output [ { name: "NOPE" data_type: TYPE_FP32 dims: [-1] } ]""",
    )
    with pytest.raises(ServingError, match="NOPE"):
        OnnxRuntimeBackend.load(_spec(repo, "identity_onnx", config))


def test_missing_model_file(tmp_path: Path) -> None:
    (tmp_path / "ghost" / "1").mkdir(parents=True)
    config = _config("ghost", "max_batch_size: 0")
    with pytest.raises(ServingError) as info:
        OnnxRuntimeBackend.load(_spec(tmp_path, "ghost", config))
    msg = info.value.message
    assert "ghost" in msg and "ghost/1/model.onnx" in msg
    assert str(tmp_path) not in msg  # only the path relative to the repository


def test_default_model_filename_and_parameters(repo: Path) -> None:
    config = _config(
        "identity_onnx",
        """max_batch_size: 8
        default_model_filename: "model.onnx"
        optimization { graph { level: 1 } }
        parameters { key: "intra_op_thread_count" value { string_value: "2" } }
        parameters { key: "execution_mode" value { string_value: "0" } }
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [-1] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [-1] } ]""",
    )
    backend = OnnxRuntimeBackend.load(_spec(repo, "identity_onnx", config))
    x = np.ones((1, 3), dtype=np.float32)
    np.testing.assert_array_equal(backend.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x)
    config.parameters["execution_mode"].string_value = "7"
    with pytest.raises(ServingError, match="execution_mode"):
        OnnxRuntimeBackend.load(_spec(repo, "identity_onnx", config))


def test_gpu_without_cuda_provider(repo: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ServingError, match="CUDAExecutionProvider") as info:
        OnnxRuntimeBackend.load(_spec(repo, "simple_onnx", device=Device("GPU", 0)))
    assert info.value.code == ErrorCode.UNAVAILABLE


def _string_model(path: Path) -> None:
    helper, tp = onnx.helper, onnx.TensorProto
    graph = helper.make_graph(
        [helper.make_node("Identity", ["TEXT_IN"], ["TEXT_OUT"])],
        "strings",
        [helper.make_tensor_value_info("TEXT_IN", tp.STRING, ["batch", None])],
        [helper.make_tensor_value_info("TEXT_OUT", tp.STRING, ["batch", None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())


def test_string_round_trip(tmp_path: Path) -> None:
    _string_model(tmp_path / "strings" / "1" / "model.onnx")
    config = _config(
        "strings",
        """max_batch_size: 4
        input [ { name: "TEXT_IN" data_type: TYPE_STRING dims: [-1] } ]
        output [ { name: "TEXT_OUT" data_type: TYPE_STRING dims: [-1] } ]""",
    )
    backend = OnnxRuntimeBackend.load(_spec(tmp_path, "strings", config))
    a = np.array([[b"hello", b"w\xc3\xb6rld\x00!"]], dtype=np.object_)
    b = np.array([[b"", b"x"], [b"yy", b"zzz"]], dtype=np.object_)
    r1, r2 = backend.execute(
        [WorkRequest(id=i, inputs={"TEXT_IN": v}, requested_outputs=[]) for i, v in enumerate((a, b))]
    )
    for sent, resp in ((a, r1), (b, r2)):
        got = resp.outputs["TEXT_OUT"]
        assert got.dtype == np.object_ and got.shape == sent.shape
        assert got.tolist() == sent.tolist()
        assert all(isinstance(x, bytes) for x in got.ravel())
    bad = np.array([[b"\xff"]], dtype=np.object_)
    with pytest.raises(ServingError, match="TEXT_IN") as info:
        backend.run({"TEXT_IN": bad}, ["TEXT_OUT"])
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_missing_onnxruntime(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ServingError, match="onnxruntime is not installed") as info:
        OnnxRuntimeBackend.load(_spec(repo, "simple_onnx"))
    assert info.value.code == ErrorCode.UNAVAILABLE
    assert "simple_onnx" in info.value.message
