"""Prometheus metrics through the real server: Triton's names and labels, counts that match
the statistics extension for plain, sequence and ensemble models, failure reasons, CPU
metrics, plain-decimal values, and the switch that turns the endpoint off."""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository

_LINE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


@pytest.fixture(scope="module")
def mserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(
        tmp_path_factory.mktemp("repo"), "add_sub", "accumulator", "crashy", "preprocess", "mlp_onnx", "postprocess",
        "pipeline",
    )  # fmt: skip
    shutil.copytree(repo / "add_sub", repo / "tagged")
    cfg = (repo / "tagged" / "config.pbtxt").read_text().replace('name: "add_sub"', 'name: "tagged"')
    (repo / "tagged" / "config.pbtxt").write_text(cfg + '\nmetric_tags { key: "team" value: "search \\"x\\"" }\n')
    srv = ServerProcess(repo, "--metrics-interval-ms", "100").start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def scrape(srv: ServerProcess) -> tuple[str, dict[tuple[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        assert re.fullmatch(r"\d+(\.\d+)?", m.group(3)), f"value not plain decimal: {line!r}"
        values[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return text, values


def _add_sub(client: httpclient.InferenceServerClient, model: str = "add_sub") -> None:
    inputs = [httpclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(np.ones(4, np.float32))
    client.infer(model, inputs)


def test_model_metrics_follow_requests(mserver: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(mserver.url)
    g = grpcclient.InferenceServerClient(mserver.grpc_url)
    try:
        for _ in range(3):
            _add_sub(h)
        _add_sub(h, "tagged")
        for step in range(2):  # a sequence: counted like any request
            i = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            i.set_data_from_numpy(np.array([[5]], np.int32))
            g.infer("accumulator", [i], sequence_id=9, sequence_start=step == 0, sequence_end=step == 1)
        with pytest.raises(InferenceServerException, match="START"):
            g.infer("accumulator", [i], sequence_id=10)  # refused by the sequence batcher: OTHER
        c = httpclient.InferInput("INPUT0", [1], "INT32")
        c.set_data_from_numpy(np.array([3], np.int32))  # crashy raises: a BACKEND failure
        with pytest.raises(InferenceServerException, match="asked to fail"):
            h.infer("crashy", [c])
        raw = httpclient.InferInput("RAW", [2, 256], "UINT8")
        raw.set_data_from_numpy(np.zeros((2, 256), np.uint8))
        h.infer("pipeline", [raw])

        text, v = scrape(mserver)
        add = '{model="add_sub",version="1"}'
        acc = '{model="accumulator",version="1"}'
        assert v[("nv_inference_request_success", add)] == 3
        assert v[("nv_inference_count", add)] == 3
        assert v[("nv_inference_exec_count", add)] == 3
        assert v[("nv_inference_request_success", acc)] == 2
        assert v[("nv_inference_request_failure", '{model="accumulator",version="1",reason="OTHER"}')] == 1
        assert v[("nv_inference_request_failure", '{model="crashy",version="1",reason="BACKEND"}')] == 1
        assert v[("nv_inference_request_failure", '{model="crashy",version="1",reason="REJECTED"}')] == 0
        assert v[("nv_inference_request_success", '{model="pipeline",version="1"}')] == 1
        assert v[("nv_inference_count", '{model="pipeline",version="1"}')] == 2
        assert v[("nv_inference_count", '{model="mlp_onnx",version="1"}')] == 2
        assert v[("nv_inference_request_success", '{model="tagged",version="1",_team="search \\"x\\""}')] == 1
        assert v[("nv_inference_request_duration_us", add)] > 0
        assert v[("nv_inference_compute_infer_duration_us", add)] > 0
        assert v[("nv_inference_pending_request_count", add)] == 0
        assert v[("nv_model_load_duration_secs", add)] > 0
        for name in ("nv_inference_request_success", "nv_inference_queue_duration_us", "nv_cpu_utilization"):
            assert f"# TYPE {name} " in text and f"# HELP {name} " in text
        assert not re.search(r"^\w+_(total|created)[{ ]", text, re.M)  # no prometheus_client renaming

        # the same numbers as the statistics extension
        stats = h.get_inference_statistics("accumulator")["model_stats"][0]
        assert v[("nv_inference_count", acc)] == stats["inference_count"]
        assert v[("nv_inference_exec_count", acc)] == stats["execution_count"]
        assert v[("nv_inference_request_success", acc)] == stats["inference_stats"]["success"]["count"]
    finally:
        h.close()
        g.close()


def test_cpu_metrics(mserver: ServerProcess) -> None:
    _, v = scrape(mserver)
    total = v[("nv_cpu_memory_total_bytes", "")]
    assert total > 1 << 28  # more than 256 MiB, printed without an exponent
    assert 0 < v[("nv_cpu_memory_used_bytes", "")] < total
    assert 0.0 <= v[("nv_cpu_utilization", "")] <= 1.0
    assert not any(name.startswith("nv_gpu") for name, _ in v)  # no GPU here


def test_metrics_switched_off(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    srv = ServerProcess(make_repository(tmp_path / "repo", "add_sub"), "--allow-metrics=false").start()
    fresh_server.append(srv)
    assert srv.metrics_port == 0 and "Metrics listening" not in srv.log
    assert srv.terminate() == 0
