"""The rate limiter through the real server: instances of two models that need the same
resource never execute at the same time under ``--rate-limit execution_count`` (and do
without it); a resource count below an instance's need fails its load with Triton's text."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess

# answers the wall-clock interval of its execution
MODEL = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        start = time.time()
        time.sleep(0.15)
        span = np.array([start, time.time()], dtype=np.float64)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("SPAN", span)]) for _ in requests]
"""
CONFIG = """
backend: "python"
max_batch_size: 0
input [{ name: "IN", data_type: TYPE_INT32, dims: [1] }]
output [{ name: "SPAN", data_type: TYPE_FP64, dims: [2] }]
instance_group [{
  kind: KIND_CPU, count: 1
  rate_limiter { resources [{ name: "R", count: 1 }] priority: 1 }
}]
"""


def _repo(root: Path, names: tuple[str, ...] = ("ra", "rb")) -> Path:
    for name in names:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(textwrap.dedent(MODEL))
        (root / name / "config.pbtxt").write_text(CONFIG)
    return root


def _spans(srv: ServerProcess) -> list[tuple[float, float]]:
    def call(i: int) -> tuple[float, float]:
        c = httpclient.InferenceServerClient(srv.url)
        inp = httpclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([i], dtype=np.int32))
        start, end = c.infer("ra" if i % 2 else "rb", [inp]).as_numpy("SPAN").tolist()
        c.close()
        return start, end

    with ThreadPoolExecutor(8) as pool:
        return sorted(pool.map(call, range(8)))


def _overlaps(spans: list[tuple[float, float]]) -> int:
    return sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1] - 0.01)


def test_shared_resource_serializes_executions(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = _repo(tmp_path / "repo")
    srv = ServerProcess(repo, "--rate-limit", "execution_count")
    fresh_server.append(srv)
    srv.start()
    spans = _spans(srv)
    assert _overlaps(spans) == 0, spans
    assert srv.terminate() == 0
    # without the rate limiter the two models' instances run at the same time
    srv = ServerProcess(repo)
    fresh_server.append(srv)
    srv.start()
    assert _overlaps(_spans(srv)) > 0
    assert srv.terminate() == 0


def test_too_few_resources_fail_the_load(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = _repo(tmp_path / "repo", ("ra",))
    srv = ServerProcess(repo, "--rate-limit=execution_count", "--rate-limit-resource=R:0")
    fresh_server.append(srv)
    srv.start()
    (entry,) = srv.client().get_model_repository_index()
    assert entry["state"] == "UNAVAILABLE"
    assert entry["reason"].endswith(
        'Resource count for "R" is limited to 0 which will prevent scheduling of one or more model instances, '
        "the minimum required count is 1"
    ), entry
    assert srv.terminate() == 0
