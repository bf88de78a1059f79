"""The TensorRT backend through the real server: an engine built here from the example ONNX
model (simple_onnx: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, INT32 [16],
batching), a configuration completed from the engine, dynamic batching, CUDA shared memory,
and the errors for a KIND_CPU instance and a datatype mismatch.

NEVER RUN SO FAR: TensorRT cannot be installed on any machine this project has, so this
module skips where ``tensorrt`` is missing (everywhere, today)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt")
cupy = pytest.importorskip("cupy")
cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")

import tritonclient.http as httpclient  # noqa: E402

from tests.e2e.server import ROOT, ServerProcess  # noqa: E402

IO = """input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "INPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "OUTPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
"""  # noqa: E501


def _plan() -> bytes:
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "scripts" / "make_examples.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_examples"] = mod
    spec.loader.exec_module(mod)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(mod.simple_model().SerializeToString()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("INPUT0", "INPUT1"):
        profile.set_shape(name, (1, 16), (4, 16), (8, 16))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    return bytes(plan)


def _model(repo: Path, name: str, plan: bytes, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.plan").write_bytes(plan)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "tensorrt_plan"\n{config}')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    plan = _plan()
    gpu = "instance_group [ { kind: KIND_GPU, count: 1, gpus: [ 0 ] } ]\n"
    _model(repo, "trt_simple", plan, "max_batch_size: 8\n" + IO + "dynamic_batching { }\n" + gpu)
    _model(repo, "trt_auto", plan, gpu)  # inputs, outputs and max batch size from the engine
    _model(repo, "trt_cpu", plan, "max_batch_size: 8\n" + IO + "instance_group [ { kind: KIND_CPU } ]\n")
    _model(repo, "trt_bad_type", plan, "max_batch_size: 8\n" + IO.replace("TYPE_INT32", "TYPE_FP32", 1) + gpu)
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _inputs(x: np.ndarray, y: np.ndarray) -> list[Any]:
    inputs = [httpclient.InferInput(n, list(v.shape), "INT32") for n, v in (("INPUT0", x), ("INPUT1", y))]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    return inputs


def test_engine_sums_and_differences(server: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(server.url)
    try:
        x = np.arange(48, dtype=np.int32).reshape(3, 16)
        y = np.full((3, 16), 7, np.int32)
        for model in ("trt_simple", "trt_auto"):
            r = h.infer(model, _inputs(x, y))
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + y)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        cfg = h.get_model_config("trt_auto")
        assert cfg["max_batch_size"] == 8 and [i["name"] for i in cfg["input"]] == ["INPUT0", "INPUT1"]
    finally:
        h.close()


def test_cuda_shared_memory_in_and_out(server: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(server.url)
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    n = x.nbytes
    region = cudashm.create_shared_memory_region("trt", 4 * n, 0)
    try:
        cudashm.set_shared_memory_region(region, [x, x])
        h.register_cuda_shared_memory("trt", cudashm.get_raw_handle(region), 0, 4 * n)
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory("trt", n)
        inputs[1].set_shared_memory("trt", n, offset=n)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        out.set_shared_memory("trt", n, offset=2 * n)
        h.infer("trt_simple", inputs, outputs=[out])
        np.testing.assert_array_equal(cudashm.get_contents_as_numpy(region, np.int32, [4, 16])[2:3], 2 * x)
    finally:
        h.unregister_cuda_shared_memory()
        h.close()
        cudashm.destroy_shared_memory_region(region)


def test_load_errors_name_the_problem(server: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(server.url)
    try:
        index = {e["name"]: e for e in h.get_model_repository_index()}
        assert "run on GPUs only" in index["trt_cpu"]["reason"]
        assert "'INPUT0' is FP32 in the configuration but INT32 in the engine" in index["trt_bad_type"]["reason"]
    finally:
        h.close()
