"""``--model-load-gpu-limit`` on a GPU: a limit the device is already over refuses a GPU
instance's load with Triton's text (the model is not READY, the server runs on, nothing left
behind); a limit of 1.0 loads it. Run with ``scripts/gpu_check`` on the device machine."""

import re
import time

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import requests  # noqa: E402

from tests.e2e.server import ServerProcess  # noqa: E402
from tests.e2e.test_pytorch import DOUBLE, Double, save_model  # noqa: E402


def _serve(tmp_path, limit: str) -> ServerProcess:  # type: ignore[no-untyped-def]
    repo = tmp_path / f"repo-{limit.replace(':', '_')}"
    repo.mkdir()
    save_model(repo, "pt_double_gpu", Double(), DOUBLE)
    return ServerProcess(repo, "--model-load-gpu-limit", limit, "--exit-on-error=false").start()


def test_a_device_over_the_limit_refuses_the_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = _serve(tmp_path, "0:0.000001")  # any use of the GPU is over it: the instance itself is
    try:
        r = requests.get(f"http://{srv.url}/v2/models/pt_double_gpu/ready", timeout=10)
        # no version of it loaded: Triton's "unknown model" answer (PROTOCOL.md 1.1)
        assert r.status_code == 404, r.text
        assert r.json() == {"error": "Request for unknown model: 'pt_double_gpu' has no available versions"}
        assert re.search(
            r"can not create model 'pt_double_gpu[^']*': memory limit set for GPU 0 has exceeded, "
            r"model loading is rejected\.",
            srv.log,
        ), srv.log
    finally:
        assert srv.terminate() == 0, srv.log
        assert not srv.segments()


def test_a_limit_of_one_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = _serve(tmp_path, "0:1.0")
    try:
        deadline = time.monotonic() + 60
        while requests.get(f"http://{srv.url}/v2/models/pt_double_gpu/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.2)
        x = np.arange(8, dtype=np.float32)
        body = {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [8], "data": x.tolist()}]}
        out = requests.post(f"http://{srv.url}/v2/models/pt_double_gpu/infer", json=body, timeout=30).json()
        assert out["outputs"][0]["data"] == (x * 2).tolist()
    finally:
        assert srv.terminate() == 0, srv.log
