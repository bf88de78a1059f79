"""``--metrics-config`` through the real server: latency summaries with chosen quantiles,
the first-response histogram, and the cumulative latency counters switched off."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import requests
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository


def test_summaries_histogram_and_no_counters(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    srv = ServerProcess(
        make_repository(tmp_path / "repo", "add_sub"),
        "--metrics-config=summary_latencies=true",
        "--metrics-config=summary_quantiles=0.5:0.05,0.99:0.001",
        "--metrics-config=histogram_latencies=true",
        "--metrics-config=counter_latencies=false",
    )
    fresh_server.append(srv)
    srv.start()
    c = srv.client()
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(np.ones(4, dtype=np.float32))
    for _ in range(20):
        c.infer("add_sub", inputs)
    text = requests.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    labels = 'model="add_sub",version="1"'
    assert "# TYPE nv_inference_request_summary_us summary" in text
    for name in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        full = f"nv_inference_{name}_summary_us"
        quantiles = re.findall(rf'{full}{{{labels},quantile="([0-9.]+)"}} ([0-9.]+)', text)
        assert [q for q, _ in quantiles] == ["0.5", "0.99"], (full, text)
        assert float(quantiles[0][1]) <= float(quantiles[1][1])
        assert f"{full}_count{{{labels}}} 20" in text
    assert "nv_cache_hit_summary_per_model" not in text  # no response cache here
    assert "# TYPE nv_inference_first_response_histogram_ms histogram" in text
    assert f'nv_inference_first_response_histogram_ms_bucket{{{labels},le="+Inf"}} 20' in text
    assert f"nv_inference_first_response_histogram_ms_count{{{labels}}} 20" in text
    assert "nv_inference_request_duration_us" not in text and "nv_inference_queue_duration_us" not in text
    assert f"nv_inference_request_success{{{labels}}} 20" in text
    assert srv.terminate() == 0
