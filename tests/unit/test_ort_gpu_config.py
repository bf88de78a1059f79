"""ONNX Runtime on a GPU, the parts that run without one: the execution providers and their
options as Triton's onnxruntime backend derives them from the configuration
(``workers/backends/ortcuda.py``), and the IO-binding run on a CPU session (the same calls a
GPU session makes with host inputs and outputs). The GPU itself: tests/gpu."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends import ortcuda
from shoal.workers.backends.base import Device, ModelSpec


class _Ort:
    def __init__(self, *available: str) -> None:
        self.available = list(available)

    def get_available_providers(self) -> list[str]:
        return self.available


def _spec(text: str) -> ModelSpec:
    config = text_format.Parse(f'name: "m"\nbackend: "onnxruntime"\n{text}', mc.ModelConfig())
    return ModelSpec("m", 1, config, "/r", "/r/m", "/r/m/1", "m_0", Device("GPU", 0))


def test_cuda_provider_with_triton_parameters() -> None:
    spec = _spec(
        'parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }\n'
        'parameters { key: "gpu_mem_limit" value: { string_value: "4294967200" } }\n'
        'parameters { key: "arena_extend_strategy" value: { string_value: "1" } }\n'
        'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "cuda"\n'
        '  parameters { key: "cudnn_conv_use_max_workspace" value: "0" } } ] } }'
    )
    got = ortcuda.providers(_Ort("CUDAExecutionProvider", "CPUExecutionProvider"), spec)
    assert got == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": "0",
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
                "gpu_mem_limit": "4294967200",
                "cudnn_conv_use_max_workspace": "0",
            },
        ),
        "CPUExecutionProvider",
    ]


def test_tensorrt_first_with_its_options_mapped() -> None:
    spec = _spec(
        'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
        '  parameters { key: "precision_mode" value: "FP16" }\n'
        '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
        '  parameters { key: "trt_engine_cache_enable" value: "1" } } ] } }'
    )
    ort = _Ort("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    trt, cuda, cpu = ortcuda.providers(ort, spec)
    assert trt == (
        "TensorrtExecutionProvider",
        {
            "device_id": "0",
            "trt_fp16_enable": "True",
            "trt_max_workspace_size": "1073741824",
            "trt_engine_cache_enable": "1",
        },
    )
    assert cuda[0] == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    with pytest.raises(ServingError, match="TensorrtExecutionProvider") as info:
        ortcuda.providers(_Ort("CUDAExecutionProvider", "CPUExecutionProvider"), spec)
    assert info.value.code is ErrorCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "openvino" } ] } }',
         "unknown Execution Accelerator 'openvino' is requested"),
        ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
         '  parameters { key: "precision_mode" value: "FP8" } } ] } }', "unsupported precision mode 'FP8'"),
        ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
         '  parameters { key: "speed" value: "max" } } ] } }', "unknown parameter 'speed'"),
        ('parameters { key: "cudnn_conv_algo_search" value: { string_value: "7" } }', "must be one of 0, 1, 2"),
    ],
)  # fmt: skip
def test_bad_accelerator_settings_fail_the_load(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ortcuda.providers(_Ort("TensorrtExecutionProvider", "CUDAExecutionProvider"), _spec(text))


def test_no_cuda_provider_fails_as_unavailable() -> None:
    with pytest.raises(ServingError, match="CUDAExecutionProvider") as info:
        ortcuda.providers(_Ort("CPUExecutionProvider"), _spec(""))
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_cuda_graphs_enable_the_providers_capture() -> None:
    """``optimization.cuda.graphs`` (``ortgraphs``): the CUDA provider's ``enable_cuda_graph``."""
    spec = _spec("optimization { cuda { graphs: true } }")
    got = ortcuda.providers(_Ort("CUDAExecutionProvider", "CPUExecutionProvider"), spec, graphs=True)
    assert got[0] == ("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"})
    assert "enable_cuda_graph" not in ortcuda.providers(_Ort("CUDAExecutionProvider"), spec)[0][1]


def test_cuda_graphs_need_an_onnxruntime_with_graph_ids() -> None:
    from shoal.workers.backends.onnxruntime import GRAPH_IDS_SINCE, _version

    assert _version("1.31.1") >= GRAPH_IDS_SINCE and _version("1.18.0") >= GRAPH_IDS_SINCE
    assert _version("1.17.3") < GRAPH_IDS_SINCE and _version("1.16.0rc1") < GRAPH_IDS_SINCE


@pytest.mark.parametrize("graph_session", [False, True], ids=["plain", "graph-session-run-options"])
def test_io_binding_run_on_a_cpu_session(tmp_path: Path, graph_session: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "X"], ["Y"]), helper.make_node("Neg", ["X"], ["Z"])], "g", [x], [y, z]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    session: Any = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = ortcuda.IoBindingRun(session, {"Y": np.float32, "Z": np.float32}, ort if graph_session else None)
    assert (run.run_options is not None) == graph_session  # a graph session's runs outside a graph: id -1
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    for _ in range(3):  # a binding per run
        out = run.run({"X": data[:, :]}, ["Z", "Y"], frozenset())
        np.testing.assert_array_equal(out["Y"], data * 2)
        np.testing.assert_array_equal(out["Z"], -data)
    out = run.run({"X": data.T.copy().T}, ["Y"], frozenset({"Y"}))  # not C-contiguous; no GPU: host
    np.testing.assert_array_equal(out["Y"], data * 2)


def test_backend_batches_through_io_binding(tmp_path: Path) -> None:
    """The backend's IO-binding branch (a GPU instance's) on a CPU session: a batch of
    requests merged, run once through the binding, split back per request."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import importlib.util
    import sys

    from shoal.workers.backends.base import WorkRequest
    from shoal.workers.backends.onnxruntime import OnnxRuntimeBackend

    root = Path(__file__).resolve().parents[2]
    spec_ = importlib.util.spec_from_file_location("shoal_make_examples_io", root / "scripts" / "make_examples.py")
    assert spec_ is not None and spec_.loader is not None
    make = importlib.util.module_from_spec(spec_)
    sys.modules["shoal_make_examples_io"] = make
    spec_.loader.exec_module(make)
    make.make_examples(tmp_path)
    config = text_format.Parse((tmp_path / "simple_onnx" / "config.pbtxt").read_text(), mc.ModelConfig())
    spec = ModelSpec(
        "simple_onnx", 1, config, str(tmp_path), str(tmp_path / "simple_onnx"),
        str(tmp_path / "simple_onnx" / "1"), "simple_onnx_0", Device(),
    )  # fmt: skip
    backend = OnnxRuntimeBackend.load(spec)
    assert backend._io is None  # a CPU instance runs without binding ...
    backend._io = ortcuda.IoBindingRun(backend._session, ortcuda.output_dtypes(config))  # ... a GPU one with it
    assert isinstance(backend._session, ort.InferenceSession)
    rng = np.random.default_rng(1)
    requests = [
        WorkRequest(
            id=k,
            inputs={
                "INPUT0": rng.integers(0, 9, (n, 16)).astype(np.int32),
                "INPUT1": rng.integers(0, 9, (n, 16)).astype(np.int32),
            },
            requested_outputs=["OUTPUT1"] if k == 1 else [],
        )  # fmt: skip
        for k, n in enumerate((1, 2, 3))
    ]
    responses = backend.execute(requests)
    for req, resp in zip(requests, responses, strict=True):
        a, b = req.inputs["INPUT0"], req.inputs["INPUT1"]
        assert resp.error is None
        np.testing.assert_array_equal(resp.outputs["OUTPUT1"], a - b)
        if req.id != 1:
            np.testing.assert_array_equal(resp.outputs["OUTPUT0"], a + b)
        else:
            assert list(resp.outputs) == ["OUTPUT1"]
