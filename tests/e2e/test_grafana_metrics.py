"""The Grafana dashboard against a real server's ``/metrics``: every metric its queries name
is in a scrape (latency summaries, the first-response histogram and the response cache turned
on, after one request), except the GPU metrics, which need NVML and a GPU (they are checked
against Shoal's GPU metric table instead)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import requests
import tritonclient.http as httpclient

from shoal.server import metrics
from tests.e2e.server import ServerProcess, make_repository
from tests.unit.test_grafana_dashboard import expressions, metric_names


def test_dashboard_metrics_in_a_real_scrape(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    config = repo / "add_sub" / "config.pbtxt"
    config.write_text(config.read_text() + "\nresponse_cache { enable: true }\n")
    srv = ServerProcess(
        repo,
        "--metrics-config", "summary_latencies=true",
        "--metrics-config", "histogram_latencies=true",
        "--cache-config", "local,size=1048576",
        "--allow-cpu-metrics", "true",
        "--metrics-interval-ms", "100",
    )  # fmt: skip
    fresh_server.append(srv)
    srv.start()
    a = np.arange(4, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    for _ in range(2):  # a miss, then a hit
        srv.client().infer("add_sub", inputs)
    text = requests.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    scraped = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
    used = set().union(*(metric_names(e) for e in expressions()))
    gpu = {row[0] for row in metrics._GPU_METRICS}
    assert used - gpu <= scraped, sorted(used - gpu - scraped)
    assert used & gpu  # the GPU panels are there, and read Shoal's GPU names
    assert srv.terminate() == 0
