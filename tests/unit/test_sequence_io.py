"""Backends accept the model tensors the sequence batcher fills (control inputs, state inputs)
or keeps (state outputs) without their being configuration inputs or outputs, check their
datatypes, and still refuse a model input that nothing fills. Models: Triton's sequence
examples as scripts/make_triton_examples.py builds them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto.errors import ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends import tensorrt
from shoal.workers.backends.base import Device, ModelSpec
from shoal.workers.backends.sequenceio import sequence_inputs, state_outputs

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    name = "shoal_make_triton_examples"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_triton_examples.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _config(name: str) -> mc.ModelConfig:
    example = next(e for e in _script().TRITON_EXAMPLES if e.name == name)
    return text_format.Parse(example.config, mc.ModelConfig())


def test_sequence_inputs_and_state_outputs() -> None:
    assert sequence_inputs(_config("simple_sequence")) == {"START": "INT32", "READY": "INT32"}
    assert sequence_inputs(_config("simple_dyna_sequence")) == {
        "START": "INT32",
        "END": "INT32",
        "READY": "INT32",
        "CORRID": "UINT64",
    }
    dyna_string = _config("simple_string_dyna_sequence")
    assert sequence_inputs(dyna_string)["CORRID"] == "BYTES"
    assert sequence_inputs(dyna_string)["ACC_IN"] == "INT32"
    assert state_outputs(dyna_string) == {"ACC_OUT": "INT32"}
    cfg = text_format.Parse(
        "sequence_batching { control_input [ { name: 'S' control [ { kind: CONTROL_SEQUENCE_START "
        "fp32_false_true: [ 0, 1 ] } ] }, { name: 'B' control [ { kind: CONTROL_SEQUENCE_READY "
        "bool_false_true: [ false, true ] } ] } ] }",
        mc.ModelConfig(),
    )
    assert sequence_inputs(cfg) == {"S": "FP32", "B": "BOOL"}
    assert sequence_inputs(_config("simple")) == {} and state_outputs(_config("simple")) == {}


# ---- onnxruntime -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("triton_examples")
    names = ("simple_sequence", "simple_dyna_sequence", "simple_string_dyna_sequence")
    _script().make_triton_examples(root, names)
    return root


def _spec(repo: Path, name: str, config: mc.ModelConfig | None = None) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=1,
        config=config if config is not None else _config(name),
        repository=str(repo),
        model_dir=str(repo / name),
        version_dir=str(repo / name / "1"),
        instance_name=f"{name}_0",
        device=Device(),
    )


def _ort() -> type:
    pytest.importorskip("onnxruntime")
    from shoal.workers.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _col(*values: int, dtype: type = np.int32) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(-1, 1)


def test_onnx_control_inputs_load_and_run_batched(repo: Path) -> None:
    backend = _ort().load(_spec(repo, "simple_dyna_sequence"))
    try:
        assert backend.output_names() == ["OUTPUT"]
        out = backend.run(
            {
                "INPUT": _col(5, 7, 9),
                "START": _col(1, 0, 0),
                "END": _col(0, 1, 0),
                "READY": _col(1, 1, 0),
                "CORRID": _col(1000, 1001, 0, dtype=np.uint64),
            },
            ["OUTPUT"],
        )
        assert out["OUTPUT"].tolist() == [[6], [7 + 1001], [0]]
    finally:
        backend.close()


def test_onnx_state_and_string_corrid(repo: Path) -> None:
    backend = _ort().load(_spec(repo, "simple_string_dyna_sequence"))
    try:
        assert backend.output_names() == ["OUTPUT", "ACC_OUT"]
        out = backend.run(
            {
                "INPUT": _col(3, 4),
                "START": _col(0, 0),
                "END": _col(1, 0),
                "READY": _col(1, 1),
                "CORRID": np.array([[b"1002"], [b"7"]], dtype=np.object_),
                "ACC_IN": _col(10, 20),
            },
            backend.output_names(),
        )
        assert out["ACC_OUT"].tolist() == [[13], [24]]
        assert out["OUTPUT"].tolist() == [[13 + 1002], [24]]
    finally:
        backend.close()


def test_onnx_input_nothing_fills_is_still_missing(repo: Path) -> None:
    """Without sequence_batching, START is a model input missing from the configuration."""
    cfg = _config("simple_sequence")
    cfg.ClearField("sequence_batching")
    with pytest.raises(ServingError, match="model input 'START' is missing from the configuration"):
        _ort().load(_spec(repo, "simple_sequence", cfg))
    cfg = _config("simple_sequence")
    del cfg.sequence_batching.control_input[1]  # READY no longer a control input
    with pytest.raises(ServingError, match="model input 'READY' is missing from the configuration"):
        _ort().load(_spec(repo, "simple_sequence", cfg))


def test_onnx_control_datatype_must_match(repo: Path) -> None:
    cfg = _config("simple_sequence")
    ctl = cfg.sequence_batching.control_input[0].control[0]
    ctl.ClearField("int32_false_true")
    ctl.fp32_false_true.extend([0.0, 1.0])
    with pytest.raises(ServingError, match="sequence_batching input 'START' is FP32 in the configuration"):
        _ort().load(_spec(repo, "simple_sequence", cfg))
    cfg = _config("simple_dyna_sequence")
    cfg.sequence_batching.control_input[3].control[0].data_type = mc.TYPE_STRING
    with pytest.raises(ServingError, match="sequence_batching input 'CORRID' is BYTES in the configuration"):
        _ort().load(_spec(repo, "simple_dyna_sequence", cfg))


def test_onnx_control_input_the_model_lacks(repo: Path) -> None:
    cfg = _config("simple_sequence")
    extra = cfg.sequence_batching.control_input.add(name="END")
    extra.control.add(kind=mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END, int32_false_true=[0, 1])
    with pytest.raises(ServingError, match="sequence_batching input 'END' is not an input of the model"):
        _ort().load(_spec(repo, "simple_sequence", cfg))


def test_onnx_state_output_the_model_lacks(repo: Path) -> None:
    cfg = _config("simple_string_dyna_sequence")
    cfg.sequence_batching.state[0].output_name = "NOPE"
    with pytest.raises(ServingError, match="state output 'NOPE' is not an output of the model"):
        _ort().load(_spec(repo, "simple_string_dyna_sequence", cfg))


# ---- tensorrt (its configuration check only: no engine needed) --------------------------------


def _engine_io(corrid: str = "UINT64") -> dict[str, tuple[bool, str, tuple[int, ...]]]:
    return {
        "INPUT": (True, "INT32", (-1, 1)),
        "START": (True, "INT32", (-1, 1)),
        "END": (True, "INT32", (-1, 1)),
        "READY": (True, "INT32", (-1, 1)),
        "CORRID": (True, corrid, (-1, 1)),
        "OUTPUT": (False, "INT32", (-1, 1)),
    }


def test_tensorrt_accepts_control_inputs() -> None:
    spec = _spec(Path("/nonexistent"), "simple_dyna_sequence")
    tensorrt._validate(spec, _engine_io())
    with pytest.raises(ServingError, match="input 'CORRID' is UINT64 in the configuration but INT64"):
        tensorrt._validate(spec, _engine_io("INT64"))
    cfg = _config("simple_dyna_sequence")
    del cfg.sequence_batching.control_input[1]  # END
    with pytest.raises(ServingError, match="engine input 'END' is not in the configuration"):
        tensorrt._validate(_spec(Path("/nonexistent"), "simple_dyna_sequence", cfg), _engine_io())


def test_tensorrt_accepts_state() -> None:
    spec = _spec(Path("/nonexistent"), "simple_string_dyna_sequence")
    io = _engine_io("BYTES") | {"ACC_IN": (True, "INT32", (-1, 1)), "ACC_OUT": (False, "INT32", (-1, 1))}
    tensorrt._validate(spec, io)
    del io["ACC_OUT"]
    with pytest.raises(ServingError, match="configured output 'ACC_OUT' is not an engine output"):
        tensorrt._validate(spec, io)


# ---- pytorch ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated in new PyTorch
def test_pytorch_binds_control_inputs_by_argument_name() -> None:
    torch = pytest.importorskip("torch")
    from shoal.workers.backends.pytorch import PyTorchBackend

    class Dyna(torch.nn.Module):  # type: ignore[misc]
        def forward(
            self, READY: torch.Tensor, INPUT: torch.Tensor, START: torch.Tensor, END: torch.Tensor, CORRID: torch.Tensor
        ) -> torch.Tensor:
            return READY * (INPUT + START + END * CORRID.to(torch.int32))

    cfg = _config("simple_dyna_sequence")
    cfg.output[0].name = "OUTPUT__0"
    spec = _spec(Path("/nonexistent"), "simple_dyna_sequence", cfg)
    backend = PyTorchBackend(spec, torch, torch.jit.script(Dyna()), torch.device("cpu"))
    inputs = {
        "INPUT": _col(5, 7),
        "START": _col(1, 0),
        "END": _col(0, 1),
        "READY": _col(1, 1),
        "CORRID": _col(1000, 1001, dtype=np.int64),
    }
    assert backend.run(inputs, ["OUTPUT__0"])["OUTPUT__0"].tolist() == [[6], [1008]]
