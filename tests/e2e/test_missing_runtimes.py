"""Models whose runtime cannot run here fail their own load with a clear reason, and the
server serves its other models: a TensorRT plan on a server without GPUs, and (where PyTorch
is not installed) a pytorch model. The backends themselves are tested where their runtimes
are (tests/e2e/test_pytorch.py, tests/gpu/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _model(repo: Path, name: str, platform: str, filename: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / filename).write_bytes(b"not a model")
    (repo / name / "config.pbtxt").write_text(
        f'platform: "{platform}"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )


def test_models_whose_runtime_is_missing(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    if Path("/proc/driver/nvidia/gpus").exists():
        pytest.skip("this machine has a GPU")
    repo = make_repository(tmp_path / "repo", "add_sub")
    _model(repo, "plan", "tensorrt_plan", "model.plan")
    if not HAVE_TORCH:
        _model(repo, "pt", "pytorch_libtorch", "model.pt")
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        index = {e["name"]: e for e in h.get_model_repository_index()}
        entry = index["plan"]  # no GPU here: KIND_AUTO became KIND_CPU
        assert entry.get("state") == "UNAVAILABLE" and "run on GPUs only" in entry.get("reason", ""), entry
        if not HAVE_TORCH:
            entry = index["pt"]
            assert entry.get("state") == "UNAVAILABLE" and "PyTorch is not installed" in entry.get("reason", ""), entry
        inputs = [httpclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(np.ones(4, np.float32))
        np.testing.assert_array_equal(h.infer("add_sub", inputs).as_numpy("OUTPUT0"), np.full(4, 2, np.float32))
    finally:
        h.close()
    assert srv.terminate() == 0
