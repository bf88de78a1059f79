"""A check shared by the pipelined-worker tests (PyTorch and onnxruntime)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess


def assert_compute_counted_once(srv: ServerProcess, model: str, width: int) -> None:
    """8 clients send 20 requests of 32 rows of ``width`` FP32 (input ``x``) each to ``model``,
    one instance: its executions cannot have computed for longer than the load lasted
    (counted twice, their compute infer added up to nearly twice that)."""
    before = _execution_infer_ns(srv, model)
    gate = threading.Barrier(8)

    def one(k: int) -> tuple[float, float]:
        g = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            x = np.random.default_rng(k).standard_normal((32, width)).astype(np.float32)
            i = grpcclient.InferInput("x", [32, width], "FP32")
            i.set_data_from_numpy(x)
            gate.wait()
            t0 = time.monotonic()
            for _ in range(20):
                g.infer(model, [i])
            return t0, time.monotonic()
        finally:
            g.close()

    with ThreadPoolExecutor(8) as pool:
        spans = list(pool.map(one, range(8)))
    wall_ns = (max(e for _, e in spans) - min(s for s, _ in spans)) * 1e9
    infer_ns = _execution_infer_ns(srv, model) - before
    assert infer_ns <= wall_ns, f"executions computed {infer_ns / 1e6:.0f} ms in {wall_ns / 1e6:.0f} ms of load"


def _execution_infer_ns(srv: ServerProcess, model: str) -> int:
    """The compute infer time of every execution of ``model`` (its batch statistics count
    each execution once, where the inference statistics count it per request)."""
    stats = requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    return sum(int(b["compute_infer"]["ns"]) for b in stats["batch_stats"])
