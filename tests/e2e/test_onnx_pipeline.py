"""A pipelined ONNX Runtime instance (``SHOAL_PIPELINE_BATCHES: true``, the default on a GPU)
through the real server, on the CPU: each batch runs on the backend's own thread while the
worker reads and launches the next (``workers.backends.pipeline``). Under concurrent clients
over lanes (the router stopped) and through the router, inline and in system shared memory,
with batches padded to powers of two, every answer holds its own request's rows and the
statistics count every request once; no stretch of time counts as the compute of two
executions; a run that onnxruntime fails answers its batch with the error, and the instance
goes on serving. (On a GPU: tests/gpu/test_ort_cuda.py.)"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as sysshm
from tritonclient.utils import InferenceServerException

from tests.e2e.pipelinecheck import assert_compute_counted_once
from tests.e2e.server import ServerProcess, make_repository, wait_until
from tests.e2e.test_frontend_lanes import RouterStopped

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(180)

PIPELINE = 'parameters { key: "SHOAL_PIPELINE_BATCHES" value { string_value: "true" } }\n'
CLIENTS = 12
ROUNDS = 20

HEAVY = (
    """backend: "onnxruntime"
max_batch_size: 128
input [ { name: "x", data_type: TYPE_FP32, dims: [ 256 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 256 ] } ]
dynamic_batching { }
parameters { key: "intra_op_thread_count" value { string_value: "1" } }
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
    + PIPELINE
)

LOOKUP = (
    """backend: "onnxruntime"
max_batch_size: 16
input [ { name: "index", data_type: TYPE_INT64, dims: [ 1 ] } ]
output [ { name: "value", data_type: TYPE_FP32, dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
    + PIPELINE
)


def _heavy_model() -> bytes:
    """y = tanh(...tanh(x @ w)...), 24 times: milliseconds for 32 rows on one thread."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32) / 16
    nodes, prev = [], "x"
    for i in range(24):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        prev = "y" if i == 23 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [prev]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor("w", TensorProto.FLOAT, [256, 256], w.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _lookup_model() -> bytes:
    """value = table[index] of a table of 10: onnxruntime fails the run of an index past it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["g"]), helper.make_node("Squeeze", ["g", "axis"], ["value"])],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("table", TensorProto.FLOAT, [10, 1], np.arange(10, dtype=np.float32) * 10),
            helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _add(repo: Path, name: str, config: str, model: bytes) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(model)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "mlp_onnx")
    src = repo / "mlp_onnx"
    text = (src / "config.pbtxt").read_text().replace('name: "mlp_onnx"', 'name: "mlp_pipe"')
    text += 'parameters { key: "SHOAL_ORT_BATCH_BUCKETS" value { string_value: "pow2" } }\n'
    _add(repo, "mlp_pipe", text + PIPELINE, (src / "1" / "model.onnx").read_bytes())
    _add(repo, "heavy_pipe", HEAVY, _heavy_model())
    _add(repo, "lookup_pipe", LOOKUP, _lookup_model())
    srv = ServerProcess(repo, "--frontend-processes", "2").start()
    c = httpclient.InferenceServerClient(srv.url)
    for model in ("mlp_onnx", "mlp_pipe", "heavy_pipe", "lookup_pipe"):
        wait_until(lambda m=model: c.is_model_ready(m))
    c.close()
    time.sleep(0.3)  # the routes reach the frontends
    yield srv
    assert srv.terminate() == 0, srv.log[-3000:]
    assert not srv.segments()


def _stats(srv: ServerProcess, model: str) -> dict[str, Any]:
    return requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]  # type: ignore[no-any-return]


def _mlp(c: Any, model: str, x: np.ndarray, region: tuple[Any, str] | None = None) -> np.ndarray:
    """``x`` through ``model`` over gRPC, inline or in ``region`` (handle, name: input, then output)."""
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    o = grpcclient.InferRequestedOutput("OUTPUT0")
    if region is None:
        i.set_data_from_numpy(x)
        return c.infer(model, [i], outputs=[o]).as_numpy("OUTPUT0")  # type: ignore[no-any-return]
    h, name = region
    sysshm.set_shared_memory_region(h, [x])
    i.set_shared_memory(name, x.nbytes)
    o.set_shared_memory(name, x.shape[0] * 16 * 4, offset=x.nbytes)
    c.infer(model, [i], outputs=[o])
    whole = sysshm.get_contents_as_numpy(h, np.float32, [x.shape[0] * 16 + x.size])  # a view of the region
    return whole[x.size :].reshape(-1, 16).copy()


@pytest.mark.parametrize("router", ["stopped", "running"])
def test_pipelined_batches_answer_each_client_with_its_rows(server: ServerProcess, router: str) -> None:
    rng = np.random.default_rng(11)
    shapes = [[(1 + (k + i) % 3, 256) for i in range(ROUNDS)] for k in range(CLIENTS)]
    xs = [[rng.standard_normal(shape).astype(np.float32) for shape in row] for row in shapes]
    ref = grpcclient.InferenceServerClient(server.grpc_url)
    want = [[_mlp(ref, "mlp_onnx", x) for x in row] for row in xs]
    regions = []
    for k in range(CLIENTS):
        key = f"/shoaltest_{os.getpid()}_ortpipe{k}"
        regions.append(sysshm.create_shared_memory_region(f"ortpipe{k}", key, 4 * (3 * 256 + 3 * 16)))
        ref.register_system_shared_memory(f"ortpipe{k}", key, 4 * (3 * 256 + 3 * 16))
    before = _stats(server, "mlp_pipe")
    gate = threading.Barrier(CLIENTS)

    def client(k: int) -> list[np.ndarray]:
        g = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            gate.wait()
            shm = (regions[k], f"ortpipe{k}")
            return [_mlp(g, "mlp_pipe", x, None if (k + i) % 3 else shm) for i, x in enumerate(xs[k])]
        finally:
            g.close()

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            if router == "stopped":  # lanes only, batched and pipelined by the worker
                with RouterStopped(server):
                    got = list(pool.map(client, range(CLIENTS)))
            else:
                got = list(pool.map(client, range(CLIENTS)))
        for k in range(CLIENTS):
            for i in range(ROUNDS):
                np.testing.assert_allclose(got[k][i], want[k][i], rtol=1e-5, atol=1e-5)
        after = _stats(server, "mlp_pipe")
        rows = sum(x.shape[0] for row in xs for x in row)
        assert int(after["inference_count"]) - int(before["inference_count"]) == rows
        assert int(after["execution_count"]) - int(before["execution_count"]) < CLIENTS * ROUNDS, "no batches formed"
    finally:
        for k in range(CLIENTS):
            ref.unregister_system_shared_memory(f"ortpipe{k}")
            sysshm.destroy_shared_memory_region(regions[k])
        ref.close()


def test_pipelined_compute_time_is_counted_once(server: ServerProcess) -> None:
    """While batch N runs on the backend's thread the worker reads and launches N+1; that time
    is N+1's, not N's too."""
    assert_compute_counted_once(server, "heavy_pipe", 256)


def test_a_failed_run_answers_its_batch_and_the_instance_goes_on(server: ServerProcess) -> None:
    """An index past the table fails onnxruntime's run on the backend's thread: the requests
    batched with it get that error (as in Triton, a batch fails as a whole), and the requests
    after it are answered."""

    def lookup(c: Any, index: int) -> float:
        i = grpcclient.InferInput("index", [1, 1], "INT64")
        i.set_data_from_numpy(np.array([[index]], dtype=np.int64))
        return float(c.infer("lookup_pipe", [i]).as_numpy("value")[0, 0])

    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert lookup(c, 3) == 30.0
        with pytest.raises(InferenceServerException, match="onnxruntime") as failed:
            lookup(c, 99)
        assert "lookup_pipe" in str(failed.value)
        gate = threading.Barrier(6)

        def one(index: int) -> str:
            g = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                gate.wait()
                return str(lookup(g, index))
            except InferenceServerException as exc:
                return f"error: {exc.message()}"
            finally:
                g.close()

        with ThreadPoolExecutor(6) as pool:  # one bad index among them, within one queue delay
            got = list(pool.map(one, [1, 2, 99, 4, 5, 6]))
        assert got[2].startswith("error:") and "onnxruntime" in got[2], got
        for index, answer in zip([1, 2, 4, 5, 6], got[:2] + got[3:], strict=True):
            assert answer == str(index * 10.0) or answer == got[2], got
        assert [lookup(c, k) for k in range(10)] == [k * 10.0 for k in range(10)]
    finally:
        c.close()
