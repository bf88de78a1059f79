"""Custom metrics of Python models (``pb_utils.MetricFamily``) on the metrics endpoint: each
kind with its HELP/TYPE lines, values kept across a worker restart, gone after unload."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(
        tmp_path_factory, ("custom_metrics", "add_sub"), "--model-control-mode", "explicit", "--load-model", "*"
    )


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _infer(c: httpclient.InferenceServerClient, value: float, **kw: object) -> float:
    i = httpclient.InferInput("INPUT0", [1], "FP32")
    i.set_data_from_numpy(np.array([value], dtype=np.float32))
    return float(c.infer("custom_metrics", [i], **kw).as_numpy("OUTPUT0")[0])  # type: ignore[arg-type]


def _wait_ready(c: httpclient.InferenceServerClient) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if c.is_model_ready("custom_metrics"):
                return
        except InferenceServerException:
            pass
        time.sleep(0.1)
    raise AssertionError("custom_metrics did not come back")


def test_custom_metrics_appear_survive_a_restart_and_go_with_the_model(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        assert [_infer(c, v) for v in (0.5, 5.0, 50.0)] == [1.0, 2.0, 3.0]
        text = _metrics(server)
        labels = 'model="custom_metrics",version="1"'
        assert "# HELP shoal_test_requests Requests seen by the model" in text
        assert "# TYPE shoal_test_requests counter" in text
        assert f"shoal_test_requests{{{labels}}} 3" in text
        assert "# TYPE shoal_test_batch_size gauge" in text and f"shoal_test_batch_size{{{labels}}} 1" in text
        assert "# TYPE shoal_test_values histogram" in text
        assert f'shoal_test_values_bucket{{{labels},le="1"}} 1' in text
        assert f'shoal_test_values_bucket{{{labels},le="10"}} 2' in text
        assert f'shoal_test_values_bucket{{{labels},le="+Inf"}} 3' in text
        assert f"shoal_test_values_sum{{{labels}}} 55.5" in text
        assert f"shoal_test_values_count{{{labels}}} 3" in text
        # Triton's own metrics are still there
        assert "nv_inference_request_success" in text
        # the worker dies and is replaced: the values live in the router
        with pytest.raises(InferenceServerException):
            _infer(c, 1.0, parameters={"crash": True})
        _wait_ready(c)
        assert _infer(c, 1.0) == 4.0
        assert f"shoal_test_requests{{{labels}}} 4" in _metrics(server)
        c.unload_model("custom_metrics")
        text = _metrics(server)
        assert "shoal_test_requests" not in text and "shoal_test_values" not in text
        c.load_model("custom_metrics")  # a fresh start after a real unload
        assert _infer(c, 1.0) == 1.0
    finally:
        c.close()
