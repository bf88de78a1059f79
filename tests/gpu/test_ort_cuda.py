"""ONNX Runtime on a GPU through the real server: a KIND_GPU instance of an ONNX model runs on
the CUDA execution provider with IO binding, with plain tensors, with inputs and outputs in
CUDA shared memory (bound where they lie, kept on the device), and in batches mixing both,
through the router and through frontend processes (batches pipelined);
a TensorRT accelerator asks for onnxruntime's TensorRT provider (the load fails clearly
where it is missing). Needs onnxruntime-gpu, CuPy and a CUDA GPU; skipped cleanly otherwise.
Run with ``scripts/gpu_check``."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("onnxruntime without CUDAExecutionProvider (install onnxruntime-gpu)", allow_module_level=True)
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA GPU", allow_module_level=True)
except Exception as exc:  # noqa: BLE001 - no driver at all
    pytest.skip(f"no CUDA GPU ({exc})", allow_module_level=True)
cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402

from tests.e2e.server import ServerProcess, at_once, make_repository  # noqa: E402

PIPELINE = 'parameters { key: "SHOAL_PIPELINE_BATCHES" value { string_value: "true" } }\n'
GRAPHS = "dynamic_batching { max_queue_delay_microseconds: 20000 }\noptimization { cuda { graphs: true } }\n"
TRT = """optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" } } ] } }
"""


SCALER = """name: "onnx_cpu_node"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] } ]
instance_group [ { kind: KIND_GPU, count: 1 } ]
"""


def _scaler_model() -> bytes:
    """Y = (X - 1) * 2 by an ``ai.onnx.ml`` Scaler node, which the CUDA provider has no kernel
    for: onnxruntime runs it on the CPU, so it cannot capture the model in a CUDA graph."""
    from onnx import TensorProto, helper

    node = helper.make_node("Scaler", ["X"], ["Y"], domain="ai.onnx.ml", offset=[1.0], scale=[2.0])
    graph = helper.make_graph(
        [node],
        "scaler",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module", params=["router", "frontends"])
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The server alone (the router batches, the worker runs each batch as it comes), or with
    two frontend processes (their lanes reach the worker, which batches and, with
    ``SHOAL_PIPELINE_BATCHES: true``, pipelines: each batch runs on the backend's thread while
    the next is read, ``backends.pipeline``)."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), "simple_onnx", "mlp_onnx")
    batching = "dynamic_batching { max_queue_delay_microseconds: 20000 }\n" + PIPELINE
    lone = "dynamic_batching { }\n" + PIPELINE  # no delay: batches of one while the last one runs
    models = (("onnx_gpu", batching), ("onnx_trt", TRT), ("onnx_lone", lone), ("onnx_graphs", GRAPHS + PIPELINE))
    for name, extra in models:
        shutil.copytree(repo / "simple_onnx", repo / name)
        cfg = (repo / name / "config.pbtxt").read_text().replace('name: "simple_onnx"', f'name: "{name}"')
        (repo / name / "config.pbtxt").write_text(cfg.replace("KIND_CPU", "KIND_GPU") + extra)
    shutil.copytree(repo / "mlp_onnx", repo / "mlp_gpu")  # one input: staged in pinned memory
    cfg = (repo / "mlp_gpu" / "config.pbtxt").read_text().replace('name: "mlp_onnx"', 'name: "mlp_gpu"')
    cfg = cfg.replace("max_queue_delay_microseconds: 200\n", "max_queue_delay_microseconds: 20000\n")
    (repo / "mlp_gpu" / "config.pbtxt").write_text(cfg.replace("KIND_CPU", "KIND_GPU") + PIPELINE)
    (repo / "onnx_cpu_node" / "1").mkdir(parents=True)
    (repo / "onnx_cpu_node" / "1" / "model.onnx").write_bytes(_scaler_model())
    (repo / "onnx_cpu_node" / "config.pbtxt").write_text(SCALER + GRAPHS)
    frontends = ("--frontend-processes", "2") if request.param == "frontends" else ()
    srv = ServerProcess(repo, *frontends).start(wait_ready=False)
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _ready(server: ServerProcess, model: str) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        deadline = time.monotonic() + 120
        while not c.is_model_ready(model):
            assert time.monotonic() < deadline, server.log[-3000:]
            time.sleep(0.2)
    finally:
        c.close()


def _data(k: int, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x = (np.arange(16 * rows, dtype=np.int32) + k).reshape(rows, 16)
    return x, np.full((rows, 16), k, dtype=np.int32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_plain_tensors_and_cuda_shared_memory(server: ServerProcess, protocol: str) -> None:
    _ready(server, "onnx_gpu")
    mod: Any = httpclient if protocol == "http" else grpcclient
    c = mod.InferenceServerClient(server.url if protocol == "http" else server.grpc_url)
    x, y = _data(3, rows=2)
    h = cudashm.create_shared_memory_region("ortg", 4 * x.nbytes, 0)
    try:
        i0, i1 = mod.InferInput("INPUT0", [2, 16], "INT32"), mod.InferInput("INPUT1", [2, 16], "INT32")
        i0.set_data_from_numpy(x)
        i1.set_data_from_numpy(y)
        r = c.infer("onnx_gpu", [i0, i1])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + y)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        # inputs bound where they lie, OUTPUT0 kept on the device and copied into the region
        cudashm.set_shared_memory_region(h, [x, y])
        c.register_cuda_shared_memory("ortg", cudashm.get_raw_handle(h), 0, 4 * x.nbytes)
        n = x.nbytes
        i0.set_shared_memory("ortg", n)
        i1.set_shared_memory("ortg", n, offset=n)
        o0, o1 = mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")
        o0.set_shared_memory("ortg", n, offset=2 * n)
        r = c.infer("onnx_gpu", [i0, i1], outputs=[o0, o1])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        whole = cudashm.get_contents_as_numpy(h, np.int32, [8, 16])
        np.testing.assert_array_equal(whole[4:6], x + y)
    finally:
        c.unregister_cuda_shared_memory()
        c.close()
        cudashm.destroy_shared_memory_region(h)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "all-cuda-shm"])
def test_batches_mixing_cuda_shared_memory_and_plain_requests(server: ServerProcess, mixed: bool) -> None:
    """Every other request in CUDA shared memory (OUTPUT0 there too), or every request with
    both outputs there: the batch's inputs are joined on the device by one kernel launch
    (``ortcuda.DeviceGather``, padded to a power of two), both outputs stay on the device and
    each request's rows are copied into its region."""
    _ready(server, "onnx_gpu")
    n_req = 12 if mixed else 7
    handles = [cudashm.create_shared_memory_region(f"ortm{k}", 4 * 64, 0) for k in range(n_req)]
    setup = httpclient.InferenceServerClient(server.url)

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(server.url)
        try:
            x, y = _data(k)
            i0, i1 = (
                httpclient.InferInput("INPUT0", [1, 16], "INT32"),
                httpclient.InferInput("INPUT1", [1, 16], "INT32"),
            )
            outs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
            in_shm = k % 2 or not mixed
            if in_shm:
                cudashm.set_shared_memory_region(handles[k], [x, y])
                i0.set_shared_memory(f"ortm{k}", 64)
                i1.set_shared_memory(f"ortm{k}", 64, offset=64)
                outs[0].set_shared_memory(f"ortm{k}", 64, offset=128)
                if not mixed:
                    outs[1].set_shared_memory(f"ortm{k}", 64, offset=192)
            else:
                i0.set_data_from_numpy(x)
                i1.set_data_from_numpy(y)
            r = c.infer("onnx_gpu", [i0, i1], outputs=outs)
            region = cudashm.get_contents_as_numpy(handles[k], np.int32, [4, 16])
            np.testing.assert_array_equal(region[3:4] if not mixed else r.as_numpy("OUTPUT1"), x - y)
            np.testing.assert_array_equal(region[2:3] if in_shm else r.as_numpy("OUTPUT0"), x + y)
        finally:
            c.close()

    try:
        for k in range(1, n_req, 2) if mixed else range(n_req):
            setup.register_cuda_shared_memory(f"ortm{k}", cudashm.get_raw_handle(handles[k]), 0, 4 * 64)
        at_once(n_req, one)
        stats = setup.get_inference_statistics("onnx_gpu")["model_stats"][0]
        assert any(int(b["batch_size"]) > 1 for b in stats["batch_stats"]), stats["batch_stats"]
    finally:
        setup.unregister_cuda_shared_memory()
        setup.close()
        for h in handles:
            cudashm.destroy_shared_memory_region(h)


def test_batches_from_system_shared_memory_padded_on_the_gpu(server: ServerProcess) -> None:
    """Inputs read from client system shared memory into pinned memory, each batch copied up
    in one piece and padded to a power of two (both on by default on a GPU): every client gets
    its own rows, as the same model on the CPU computes them."""
    _ready(server, "mlp_gpu")
    _ready(server, "mlp_onnx")
    sizes = [1, 3, 2, 5, 1, 4, 2, 7, 3, 1, 6, 2]
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in sizes]
    keys = [f"/ortsys_{os.getpid()}_{k}" for k in range(len(xs))]
    regions = [shm.create_shared_memory_region(f"ortsys{k}", keys[k], x.nbytes) for k, x in enumerate(xs)]
    setup = httpclient.InferenceServerClient(server.url)
    got: dict[int, np.ndarray] = {}

    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            inp = grpcclient.InferInput("INPUT0", list(xs[k].shape), "FP32")
            inp.set_shared_memory(f"ortsys{k}", xs[k].nbytes)
            got[k] = c.infer("mlp_gpu", [inp]).as_numpy("OUTPUT0")
        finally:
            c.close()

    try:
        for k, x in enumerate(xs):
            shm.set_shared_memory_region(regions[k], [x])
            setup.register_system_shared_memory(f"ortsys{k}", keys[k], x.nbytes)
        for _ in range(3):  # a few rounds: batches of several sizes, the padding's size kept between them
            got.clear()
            at_once(len(xs), one)
            for k, x in enumerate(xs):
                inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                want = setup.infer("mlp_onnx", [inp]).as_numpy("OUTPUT0")
                assert got[k].shape == (x.shape[0], 16)
                # TF32 on the GPU (onnxruntime's CUDA default) against FP32 on the CPU: about 1e-3
                np.testing.assert_allclose(got[k], want, rtol=1e-2, atol=5e-3)
        stats = setup.get_inference_statistics("mlp_gpu")["model_stats"][0]
        counted = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
        assert sum(size * n for size, n in counted.items()) == 3 * sum(sizes), counted
        assert any(size > 1 for size in counted), counted
    finally:
        setup.unregister_system_shared_memory()
        setup.close()
        for h in regions:
            shm.destroy_shared_memory_region(h)


def test_two_inputs_from_system_shared_memory_sorted_on_the_gpu(server: ServerProcess) -> None:
    """A model with two inputs: the worker reads them request by request into the pinned
    staging (interleaved), the batch goes up in one copy and each input's rows are gathered on
    the device by one kernel launch (``PinnedStaging.batch_inputs``), padded to a power of two;
    every client gets its own sums and differences."""
    _ready(server, "onnx_gpu")
    sizes = [1, 2, 3, 1, 2, 1, 4, 1]
    xs = [_data(k, rows=n) for k, n in enumerate(sizes)]
    keys = [f"/ort2in_{os.getpid()}_{k}" for k in range(len(xs))]
    regions = [shm.create_shared_memory_region(f"ort2in{k}", keys[k], 2 * x.nbytes) for k, (x, _) in enumerate(xs)]
    setup = httpclient.InferenceServerClient(server.url)

    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x, y = xs[k]
            i0 = grpcclient.InferInput("INPUT0", list(x.shape), "INT32")
            i1 = grpcclient.InferInput("INPUT1", list(y.shape), "INT32")
            i0.set_shared_memory(f"ort2in{k}", x.nbytes)
            i1.set_shared_memory(f"ort2in{k}", y.nbytes, offset=x.nbytes)
            r = c.infer("onnx_gpu", [i0, i1])
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + y)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        finally:
            c.close()

    try:
        before = setup.get_inference_statistics("onnx_gpu")["model_stats"][0]["execution_count"]
        for k, (x, y) in enumerate(xs):
            shm.set_shared_memory_region(regions[k], [x, y])
            setup.register_system_shared_memory(f"ort2in{k}", keys[k], 2 * x.nbytes)
        for _ in range(3):
            at_once(len(xs), one)
        executions = int(setup.get_inference_statistics("onnx_gpu")["model_stats"][0]["execution_count"]) - int(before)
        assert executions < 3 * len(xs), executions  # some batches joined several requests
    finally:
        setup.unregister_system_shared_memory()
        setup.close()
        for h in regions:
            shm.destroy_shared_memory_region(h)


def test_requests_with_inputs_from_shared_memory_and_the_body(server: ServerProcess) -> None:
    """Requests with INPUT0 in client system shared memory (read into the pinned staging) and
    INPUT1 in the request body (not in the staging), from eight clients one after another
    with no batching delay (batches of one and of several, pipelined through frontend
    processes): INPUT1 is joined into the staging behind INPUT0's rows and both go up from
    there (``PinnedStaging._join``); every client gets its own sums and differences. (That a
    lone request keeps its staged input while the next batch is read into the staging is
    shown deterministically by
    ``test_a_lone_request_keeps_its_staged_input_while_the_next_batch_is_read``.)"""
    _ready(server, "onnx_lone")
    clients, rounds = 8, 40
    keys = [f"/ortlone_{os.getpid()}_{k}" for k in range(clients)]
    regions = [shm.create_shared_memory_region(f"ortlone{k}", keys[k], 64) for k in range(clients)]
    setup = httpclient.InferenceServerClient(server.url)

    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for n in range(rounds):
                x, y = _data(1000 * k + n)
                y = y * 3 + k  # differs from x's pattern, so a swapped input shows
                shm.set_shared_memory_region(regions[k], [x])
                i0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
                i0.set_shared_memory(f"ortlone{k}", x.nbytes)
                i1 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
                i1.set_data_from_numpy(y)
                r = c.infer("onnx_lone", [i0, i1])
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + y, err_msg=f"client {k} request {n}")
                np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y, err_msg=f"client {k} request {n}")
        finally:
            c.close()

    try:
        for k in range(clients):
            setup.register_system_shared_memory(f"ortlone{k}", keys[k], 64)
        at_once(clients, one)
        stats = setup.get_inference_statistics("onnx_lone")["model_stats"][0]
        counted = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
        assert sum(size * n for size, n in counted.items()) == clients * rounds, counted
    finally:
        setup.unregister_system_shared_memory()
        setup.close()
        for h in regions:
            shm.destroy_shared_memory_region(h)


def test_a_lone_request_keeps_its_staged_input_while_the_next_batch_is_read(tmp_path: Path) -> None:
    """The pipelined worker's order, step by step on the backend: a batch of one request whose
    INPUT0 was read into the pinned staging and whose INPUT1 was not is launched (joined on the
    host, its run left waiting for ``start``); the next batch begins and is read into the
    same staging, over INPUT0's bytes; only then does the first run. Its answer must be
    computed from its own INPUT0: ``PinnedStaging.batch_inputs`` joins INPUT1 into the staging
    and copies both up before the launch returns (where the staging cannot take a batch,
    ``OnnxRuntimeBackend._merged`` copies a lone request's staged arrays out of it)."""
    from google.protobuf import text_format

    from shoal.proto.gen import model_config_pb2 as mc
    from shoal.workers.backends.base import Device, ModelSpec, WorkRequest
    from shoal.workers.backends.onnxruntime import OnnxRuntimeBackend

    repo = make_repository(tmp_path / "repo", "simple_onnx")
    config = text_format.Parse((repo / "simple_onnx" / "config.pbtxt").read_text() + PIPELINE, mc.ModelConfig())
    config.ClearField("dynamic_batching")  # no batch padding: the batch is exactly the one request
    spec = ModelSpec(
        name="simple_onnx",
        version=1,
        config=config,
        repository=str(repo),
        model_dir=str(repo / "simple_onnx"),
        version_dir=str(repo / "simple_onnx" / "1"),
        instance_name="simple_onnx_0",
        device=Device("GPU", 0),
    )
    backend = OnnxRuntimeBackend.load(spec)
    try:
        assert backend.host_input is not None and backend.pipelined, "no pinned staging or no pipeline on this GPU"
        x, y = _data(7)

        def staged(values: np.ndarray) -> np.ndarray:
            assert backend.host_input is not None
            out = np.frombuffer(backend.host_input(values.nbytes), dtype=values.dtype).reshape(values.shape)
            out[...] = values
            return out

        backend.begin_batch()
        first = backend.launch([WorkRequest(id=1, inputs={"INPUT0": staged(x), "INPUT1": y}, requested_outputs=[])])
        backend.begin_batch()  # the next batch's read, into the same staging
        staged(np.full_like(x, -99))
        first.start()
        [resp] = first.finish()
        assert resp.error is None, resp.error
        np.testing.assert_array_equal(resp.outputs["OUTPUT0"], x + y)
        np.testing.assert_array_equal(resp.outputs["OUTPUT1"], x - y)
    finally:
        backend.close()


def test_cuda_graphs_answer_every_batch_size(server: ServerProcess) -> None:
    """``optimization { cuda { graphs: true } }`` (Shoal's, ``backends.ortgraphs``): graphs for
    batch sizes 1, 2, 4 and 8 captured at load; every batch of 1 to 8 rows, plain or in CUDA
    shared memory (an output kept on the device), and batches the batcher joins, answered with
    the request's own rows (a graph's buffers are reused: stale rows must not show); no
    pipeline thread (onnxruntime keeps graphs per thread)."""
    _ready(server, "onnx_graphs")
    assert "model 'onnx_graphs': captured onnxruntime CUDA graphs for batch sizes [1, 2, 4, 8]" in server.log
    c = httpclient.InferenceServerClient(server.url)
    h = cudashm.create_shared_memory_region("ortgr", 4 * 8 * 64, 0)
    try:
        for rows in (8, 1, 3, 2, 5, 4, 7, 6, 1):
            x, y = _data(rows * 10, rows)
            i0, i1 = (
                httpclient.InferInput("INPUT0", [rows, 16], "INT32"),
                httpclient.InferInput("INPUT1", [rows, 16], "INT32"),
            )
            i0.set_data_from_numpy(x)
            i1.set_data_from_numpy(y)
            r = c.infer("onnx_graphs", [i0, i1])
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + y)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        c.register_cuda_shared_memory("ortgr", cudashm.get_raw_handle(h), 0, 4 * 8 * 64)
        for rows in (3, 8, 1):
            x, y = _data(rows + 7, rows)
            n = x.nbytes
            cudashm.set_shared_memory_region(h, [x, y])
            i0, i1 = (
                httpclient.InferInput("INPUT0", [rows, 16], "INT32"),
                httpclient.InferInput("INPUT1", [rows, 16], "INT32"),
            )
            i0.set_shared_memory("ortgr", n)
            i1.set_shared_memory("ortgr", n, offset=n)
            o0, o1 = httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")
            o0.set_shared_memory("ortgr", n, offset=2 * n)  # kept on the device: copied out of the graph's buffer
            r = c.infer("onnx_graphs", [i0, i1], outputs=[o0, o1])
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
            whole = cudashm.get_contents_as_numpy(h, np.int32, [3 * rows, 16])
            np.testing.assert_array_equal(whole[2 * rows :], x + y)
        got: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def one(k: int) -> None:
            client = httpclient.InferenceServerClient(server.url)
            try:
                x, y = _data(100 + k, 1 + k % 3)
                i0, i1 = (
                    httpclient.InferInput("INPUT0", list(x.shape), "INT32"),
                    httpclient.InferInput("INPUT1", list(y.shape), "INT32"),
                )
                i0.set_data_from_numpy(x)
                i1.set_data_from_numpy(y)
                r = client.infer("onnx_graphs", [i0, i1])
                got[k] = (r.as_numpy("OUTPUT0") - (x + y), r.as_numpy("OUTPUT1") - (x - y))
            finally:
                client.close()

        for _ in range(3):
            at_once(6, one)  # 12 rows at most: batches of up to 8 rows, padded to a graph
            for k, (d0, d1) in got.items():
                assert not d0.any() and not d1.any(), k
        stats = c.get_inference_statistics("onnx_graphs")["model_stats"][0]
        assert any(int(b["batch_size"]) > 1 for b in stats["batch_stats"]), stats["batch_stats"]
        assert "onnx_graphs" in server.log and "CUDA graphs not used" not in server.log
    finally:
        c.unregister_cuda_shared_memory()
        c.close()
        cudashm.destroy_shared_memory_region(h)


def test_cuda_graphs_fall_back_for_a_model_outside_the_cuda_provider(server: ServerProcess) -> None:
    """``graphs: true`` on a model with a node onnxruntime runs on the CPU: it cannot be
    captured, so the instance serves without graphs (a warning says why), every batch size
    answered correctly."""
    _ready(server, "onnx_cpu_node")
    fallbacks = (
        "model 'onnx_cpu_node': onnxruntime cannot use CUDA graphs for it, serving without them",
        "model 'onnx_cpu_node': onnxruntime CUDA graphs not used, capturing failed",
    )
    assert any(f in server.log for f in fallbacks), server.log[-4000:]
    assert "model 'onnx_cpu_node': captured onnxruntime CUDA graphs" not in server.log
    c = httpclient.InferenceServerClient(server.url)
    try:
        for rows in (1, 3, 8, 2):
            x = np.arange(4 * rows, dtype=np.float32).reshape(rows, 4)
            i = httpclient.InferInput("X", [rows, 4], "FP32")
            i.set_data_from_numpy(x)
            np.testing.assert_array_equal(c.infer("onnx_cpu_node", [i]).as_numpy("Y"), (x - 1) * 2)
    finally:
        c.close()


def test_tensorrt_accelerator(server: ServerProcess) -> None:
    _ready(server, "onnx_gpu")
    c = httpclient.InferenceServerClient(server.url)
    try:
        if "TensorrtExecutionProvider" in ort.get_available_providers():
            _ready(server, "onnx_trt")
            return
        deadline = time.monotonic() + 60
        while True:
            entry = {m["name"]: m for m in c.get_model_repository_index()}["onnx_trt"]
            if entry.get("state") == "UNAVAILABLE" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert entry["state"] == "UNAVAILABLE"
        assert "TensorrtExecutionProvider" in entry["reason"], entry
    finally:
        c.close()
