"""Ragged batching through the real server (PyTorch backend, CPU): requests of different
lengths batch without padding; the model gets the flat concatenation plus batch inputs
(accumulated and plain element counts, item shapes) and its scattered output goes back to
each request in its own shape. Skipped without PyTorch."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import threading
import warnings
from pathlib import Path
from typing import Dict  # noqa: UP035 - TorchScript's spelling

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tritonclient.http as httpclient  # noqa: E402

from tests.e2e.server import ServerProcess  # noqa: E402


class SegmentSums(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(
        self, INPUT: torch.Tensor, INDEX: torch.Tensor, COUNT: torch.Tensor, SHAPES: torch.Tensor
    ) -> Dict[str, torch.Tensor]:  # noqa: UP006
        starts = INDEX - COUNT
        sums = []
        for i in range(INDEX.shape[0]):
            sums.append(INPUT[int(starts[i]) : int(INDEX[i])].sum())
        batch = torch.stack(sums).reshape(-1, 1)
        return {"DOUBLED": INPUT * 2, "SUM": batch, "ITEMS": SHAPES.to(torch.float32).reshape(-1, 1)}


CONFIG = """name: "ragged"
backend: "pytorch"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 3000000, preferred_batch_size: [ 3 ] }
input [ { name: "INPUT", data_type: TYPE_FP32, dims: [ -1 ], allow_ragged_batch: true } ]
batch_input [
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT, target_name: "INDEX", data_type: TYPE_INT32, source_input: "INPUT" },
  { kind: BATCH_ELEMENT_COUNT, target_name: "COUNT", data_type: TYPE_INT32, source_input: "INPUT" },
  { kind: BATCH_ITEM_SHAPE, target_name: "SHAPES", data_type: TYPE_INT32, source_input: "INPUT" }
]
output [
  { name: "DOUBLED", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "SUM", data_type: TYPE_FP32, dims: [ 1 ] },
  { name: "ITEMS", data_type: TYPE_FP32, dims: [ 1 ] }
]
batch_output [ { target_name: "DOUBLED", kind: BATCH_SCATTER_WITH_INPUT_SHAPE, source_input: "INPUT" } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def test_requests_of_different_lengths_batch_without_padding(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    (repo / "ragged" / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(SegmentSums()), str(repo / "ragged" / "1" / "model.pt"))
    (repo / "ragged" / "config.pbtxt").write_text(CONFIG)
    srv = ServerProcess(repo)
    fresh_server.append(srv)
    srv.start()
    lengths = (3, 4, 5)
    results: dict[int, dict[str, np.ndarray]] = {}

    barrier = threading.Barrier(len(lengths))

    def call(n: int) -> None:
        c = httpclient.InferenceServerClient(srv.url)
        inp = httpclient.InferInput("INPUT", [1, n], "FP32")
        inp.set_data_from_numpy(np.arange(1, n + 1, dtype=np.float32).reshape(1, n))
        barrier.wait(30)
        res = c.infer("ragged", [inp])
        results[n] = {k: res.as_numpy(k) for k in ("DOUBLED", "SUM", "ITEMS")}
        c.close()

    threads = [threading.Thread(target=call, args=(n,)) for n in lengths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in lengths:
        values = np.arange(1, n + 1, dtype=np.float32)
        assert results[n]["DOUBLED"].tolist() == [(values * 2).tolist()]  # its own shape [1, n]
        assert results[n]["SUM"].tolist() == [[float(values.sum())]]
        assert results[n]["ITEMS"].tolist() == [[float(n)]]  # item shape without the batch dim
    stats = srv.client().get_inference_statistics("ragged")["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 3, stats
    assert [b["batch_size"] for b in stats["batch_stats"]] == [3]
    assert srv.terminate() == 0


ORT_CONFIG = """name: "ragged_onnx"
backend: "onnxruntime"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 3000000, preferred_batch_size: [ 3 ] }
input [ { name: "INPUT", data_type: TYPE_FP32, dims: [ -1 ], allow_ragged_batch: true } ]
batch_input [
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT, target_name: "INDEX", data_type: TYPE_INT32, source_input: "INPUT" }
]
output [
  { name: "DOUBLED", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "RUNNING", data_type: TYPE_FP32, dims: [ 1 ] }
]
batch_output [ { target_name: "DOUBLED", kind: BATCH_SCATTER_WITH_INPUT_SHAPE, source_input: "INPUT" } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def _onnx_model(path: Path) -> None:
    """DOUBLED = INPUT * 2; RUNNING[i] = the sum of INPUT up to the end of request i."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["INPUT", "two"], ["DOUBLED"]),
        helper.make_node("CumSum", ["INPUT", "axis"], ["cs"]),
        helper.make_node("Sub", ["INDEX", "one"], ["last"]),
        helper.make_node("Gather", ["cs", "last"], ["ends"]),
        helper.make_node("Reshape", ["ends", "column"], ["RUNNING"]),
    ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axis", TensorProto.INT32, [], [0]),
        helper.make_tensor("one", TensorProto.INT32, [], [1]),
        helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "ragged",
        [
            helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("INDEX", TensorProto.INT32, ["b"]),
        ],
        [
            helper.make_tensor_value_info("DOUBLED", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("RUNNING", TensorProto.FLOAT, ["b", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_ragged_batch(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    pytest.importorskip("onnxruntime")
    repo = tmp_path / "repo"
    (repo / "ragged_onnx" / "1").mkdir(parents=True)
    _onnx_model(repo / "ragged_onnx" / "1" / "model.onnx")
    (repo / "ragged_onnx" / "config.pbtxt").write_text(ORT_CONFIG)
    srv = ServerProcess(repo)
    fresh_server.append(srv)
    srv.start()
    results: dict[int, dict[str, np.ndarray]] = {}
    barrier = threading.Barrier(3)

    def call(n: int) -> None:
        c = httpclient.InferenceServerClient(srv.url)
        inp = httpclient.InferInput("INPUT", [1, n], "FP32")
        inp.set_data_from_numpy(np.arange(1, n + 1, dtype=np.float32).reshape(1, n))
        barrier.wait(30)
        res = c.infer("ragged_onnx", [inp])
        results[n] = {k: res.as_numpy(k) for k in ("DOUBLED", "RUNNING")}
        c.close()

    threads = [threading.Thread(target=call, args=(n,)) for n in (3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in (3, 4, 5):
        assert results[n]["DOUBLED"].tolist() == [[2.0 * v for v in range(1, n + 1)]]
    stats = srv.client().get_inference_statistics("ragged_onnx")["model_stats"][0]
    assert stats["execution_count"] == 1, stats
    # one batch in the order the batcher formed it: the running sums end where each request ends
    ends = sorted(float(results[n]["RUNNING"][0][0]) for n in (3, 4, 5))
    totals = {3: 6.0, 4: 10.0, 5: 15.0}
    assert ends[-1] == 31.0 and ends[0] in totals.values(), ends
    assert srv.terminate() == 0
