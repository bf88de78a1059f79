"""Without PyTorch in the worker's environment a pytorch model fails its own load with a
clear reason, and the server serves its other models. (The backend itself is tested in
tests/gpu/test_pytorch.py where PyTorch is installed.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")


def test_pytorch_model_without_pytorch(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    (repo / "pt" / "1").mkdir(parents=True)
    (repo / "pt" / "1" / "model.pt").write_bytes(b"PK")
    (repo / "pt" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        entry = next(e for e in h.get_model_repository_index() if e["name"] == "pt")
        assert entry.get("state") == "UNAVAILABLE" and "PyTorch is not installed" in entry.get("reason", ""), entry
        inputs = [httpclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(np.ones(4, np.float32))
        np.testing.assert_array_equal(h.infer("add_sub", inputs).as_numpy("OUTPUT0"), np.full(4, 2, np.float32))
    finally:
        h.close()
    assert srv.terminate() == 0
