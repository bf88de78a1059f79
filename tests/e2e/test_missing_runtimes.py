"""Models whose runtime cannot run here fail their own load with a clear reason, and the
server serves its other models: a pytorch model without PyTorch, a TensorRT plan on a server
without GPUs. (The backends themselves are tested in tests/gpu/ where their runtimes are.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")


def test_models_whose_runtime_is_missing(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    (repo / "pt" / "1").mkdir(parents=True)
    (repo / "pt" / "1" / "model.pt").write_bytes(b"PK")
    (repo / "pt" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    (repo / "plan" / "1").mkdir(parents=True)
    (repo / "plan" / "1" / "model.plan").write_bytes(b"engine")
    (repo / "plan" / "config.pbtxt").write_text(
        'platform: "tensorrt_plan"\nmax_batch_size: 0\n'
        'input [ { name: "X", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        index = {e["name"]: e for e in h.get_model_repository_index()}
        entry = index["pt"]
        assert entry.get("state") == "UNAVAILABLE" and "PyTorch is not installed" in entry.get("reason", ""), entry
        entry = index["plan"]  # no GPU here: KIND_AUTO became KIND_CPU
        assert entry.get("state") == "UNAVAILABLE" and "run on GPUs only" in entry.get("reason", ""), entry
        inputs = [httpclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(np.ones(4, np.float32))
        np.testing.assert_array_equal(h.infer("add_sub", inputs).as_numpy("OUTPUT0"), np.full(4, 2, np.float32))
    finally:
        h.close()
    assert srv.terminate() == 0
