"""The dynamic batcher and the statistics extension through the real server: concurrent
requests share executions and each client gets its own slice; queue limits, timeouts and
priorities give the documented errors; statistics match what was sent."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository


@pytest.fixture(scope="module")
def bserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "batcher", "add_sub", "reshaper")
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _stats(server: ServerProcess, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.url, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _fire(server: ServerProcess, n: int, **kwargs: Any) -> list[Any]:
    """``n`` concurrent gRPC requests (rows i*10 .. i*10+rows); results or exceptions, in order."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: list[Any] = [None] * n
    done = threading.Semaphore(0)
    rows = kwargs.pop("rows", 1)
    params = kwargs.pop("parameters", {})
    try:
        for i in range(n):
            x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + i * 10
            inp = grpcclient.InferInput("INPUT0", [rows, 3], "FP32")
            inp.set_data_from_numpy(x)

            def cb(result: Any, error: Any, i: int = i) -> None:
                results[i] = error if error is not None else result
                done.release()

            client.async_infer("batcher", [inp], cb, parameters=dict(params), **kwargs)
        for _ in range(n):
            assert done.acquire(timeout=60)
    finally:
        client.close()
    return results


def test_concurrent_requests_share_executions(bserver: ServerProcess) -> None:
    _, before = _stats(bserver, "/v2/models/batcher/stats")
    base = before["model_stats"][0]
    results = _fire(bserver, 12, rows=2, parameters={"delay_ms": 30})
    shared = 0
    for i, r in enumerate(results):
        assert not isinstance(r, Exception), r
        expect = np.arange(6, dtype=np.float32).reshape(2, 3) + i * 10
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), expect)  # each client its own slice
        shared += int(r.as_numpy("REQUESTS")[0, 0]) > 1
    assert shared > 0, "no request shared an execution"
    _, after = _stats(bserver, "/v2/models/batcher/stats")
    s = after["model_stats"][0]
    inferences = s["inference_count"] - base["inference_count"]
    executions = s["execution_count"] - base["execution_count"]
    assert inferences == 24  # batch elements: 12 requests x 2 rows
    assert executions < 12
    stats = s["inference_stats"]
    assert stats["success"]["count"] - base["inference_stats"]["success"]["count"] == 12
    assert stats["queue"]["ns"] > base["inference_stats"]["queue"]["ns"]
    sizes = {b["batch_size"] for b in s["batch_stats"]}
    assert sizes and max(sizes) <= 8 and any(size > 2 for size in sizes)


def test_queue_full_is_unavailable(bserver: ServerProcess) -> None:
    results = _fire(bserver, 40, rows=1, parameters={"delay_ms": 200})
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors, "the queue never filled"
    for e in errors:
        # Triton's text and code
        assert e.status() == "StatusCode.UNAVAILABLE" and "] Exceeds maximum queue size" in str(e), e
    assert len(errors) < 40


def test_request_timeout_in_queue(bserver: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(bserver.grpc_url)
    try:
        blocker = threading.Thread(target=_fire, args=(bserver, 8), kwargs={"parameters": {"delay_ms": 400}})
        blocker.start()
        time.sleep(0.1)  # the instance is busy now
        inp = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("batcher", [inp], parameters={"timeout": 1000})
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "Request timeout expired" in str(err.value)
        blocker.join(60)
    finally:
        client.close()


def test_priority_outside_levels(bserver: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(bserver.url)
    try:
        inp = httpclient.InferInput("INPUT0", [1, 3], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="priority 3 is outside"):
            c.infer("batcher", [inp], priority=3)
        r = c.infer("batcher", [inp], priority=1)
        assert r.as_numpy("OUTPUT0").shape == (1, 3)
        with pytest.raises(InferenceServerException, match="'timeout' must be a non-negative integer"):
            c.infer("batcher", [inp], parameters={"timeout": "soon"})
    finally:
        c.close()


def test_statistics_shape(bserver: ServerProcess) -> None:
    # perf_analyzer reports server-side statistics only when the extension is listed
    assert "statistics" in _stats(bserver, "/v2")[1]["extensions"]
    status, body = _stats(bserver, "/v2/models/stats")
    assert status == 200
    names = {(m["name"], m["version"]) for m in body["model_stats"]}
    assert names == {("batcher", "1"), ("add_sub", "1"), ("reshaper", "1")}
    status, body = _stats(bserver, "/v2/models/add_sub/versions/1/stats")
    (m,) = body["model_stats"]
    for key in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        assert set(m["inference_stats"][key]) == {"count", "ns"}
    for key in ("last_inference", "inference_count", "execution_count", "batch_stats"):
        assert key in m
    status, body = _stats(bserver, "/v2/models/nope/stats")
    assert status == 400 and "requested model 'nope' is not available" in body["error"]
    g = grpcclient.InferenceServerClient(bserver.grpc_url)
    try:
        c = httpclient.InferenceServerClient(bserver.url)
        a = httpclient.InferInput("INPUT0", [4], "FP32")
        a.set_data_from_numpy(np.ones(4, dtype=np.float32))
        b = httpclient.InferInput("INPUT1", [4], "FP32")
        b.set_data_from_numpy(np.ones(4, dtype=np.float32))
        before = g.get_inference_statistics("add_sub").model_stats[0]
        c.infer("add_sub", [a, b])
        c.close()
        after = g.get_inference_statistics("add_sub", "1").model_stats[0]
        assert after.inference_count == before.inference_count + 1
        assert after.execution_count == before.execution_count + 1
        assert after.inference_stats.success.count == before.inference_stats.success.count + 1
        assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
        assert after.last_inference > 0
        with pytest.raises(InferenceServerException) as err:
            g.get_inference_statistics("nope")
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        g.close()


def test_reshape_and_shapes_in_batches(bserver: ServerProcess) -> None:
    """Input and output ``reshape`` with a variable dimension through the batcher: requests
    of different variable dims never share a batch, zero-sized batches pass, each client
    gets its own result in its own shape."""
    shapes = [(1, 2, 3), (2, 2, 3), (1, 2, 5), (0, 2, 3), (3, 2, 3), (1, 2, 5)]
    client = grpcclient.InferenceServerClient(bserver.grpc_url)
    results: list[Any] = [None] * len(shapes)
    done = threading.Semaphore(0)
    try:
        for i, shape in enumerate(shapes):
            x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 100 * i
            inp = grpcclient.InferInput("INPUT0", list(shape), "FP32")
            inp.set_data_from_numpy(x)

            def cb(result: Any, error: Any, i: int = i) -> None:
                results[i] = error if error is not None else result
                done.release()

            client.async_infer("reshaper", [inp], cb)
        for _ in shapes:
            assert done.acquire(timeout=60)
    finally:
        client.close()
    for i, (shape, r) in enumerate(zip(shapes, results, strict=True)):
        assert not isinstance(r, Exception), (shape, r)
        x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 100 * i
        out = r.as_numpy("OUTPUT0")
        if shape[0] == 0:  # no elements: a variable output dimension cannot be recovered
            assert out.size == 0 and out.shape[:2] == (0, 2)
            continue
        assert out.shape == shape
        np.testing.assert_array_equal(out, x + 1)
        assert r.as_numpy("SEEN_RANK").reshape(-1).tolist() == [2] * shape[0]


def test_instances_execute_in_parallel(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """Two instances run two slow requests at the same time; one instance runs them in turn."""
    repo = make_repository(tmp_path / "repo", "slow")
    one = repo / "slow_one"
    shutil.copytree(repo / "slow", one)
    cfg = (one / "config.pbtxt").read_text().replace('name: "slow"', 'name: "slow_one"')
    (one / "config.pbtxt").write_text(cfg.replace("count: 2", "count: 1"))
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        elapsed = {}
        for model in ("slow", "slow_one"):
            done = threading.Semaphore(0)

            def release(result: Any, error: Any, done: threading.Semaphore = done) -> None:
                done.release()  # tritonclient passes result= and error= by keyword

            start = time.monotonic()
            for _ in range(2):
                inp = grpcclient.InferInput("INPUT0", [1], "FP32")
                inp.set_data_from_numpy(np.ones(1, dtype=np.float32))
                client.async_infer(model, [inp], release, parameters={"delay_ms": 400})
            for _ in range(2):
                assert done.acquire(timeout=30)
            elapsed[model] = time.monotonic() - start
        assert elapsed["slow"] < 0.75 <= elapsed["slow_one"], elapsed
    finally:
        client.close()
    assert srv.terminate() == 0


def test_preserve_ordering(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """Two instances, no queue delay: a slow request and a fast one behind it run at once;
    with preserve_ordering the fast one's response waits for the slow one's (a gRPC stream
    shows the order), without it the fast one comes first."""
    repo = make_repository(tmp_path / "repo", "batcher")
    base = (repo / "batcher" / "config.pbtxt").read_text()
    base = base.replace("max_queue_delay_microseconds: 50000", "max_queue_delay_microseconds: 0")
    base = base.replace("count: 1", "count: 2")
    for name, extra in (("ordered", "preserve_ordering: true\n"), ("unordered", "")):
        shutil.copytree(repo / "batcher", repo / name)
        cfg = base.replace('name: "batcher"', f'name: "{name}"').replace(
            "dynamic_batching {", "dynamic_batching {\n" + extra
        )
        (repo / name / "config.pbtxt").write_text(cfg)
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    try:
        for model, expect in (("ordered", ["slow", "fast"]), ("unordered", ["fast", "slow"])):
            order: list[Any] = []
            got = threading.Semaphore(0)

            def on_response(result: Any, error: Any, order: list[Any] = order, got: threading.Semaphore = got) -> None:
                order.append(error or result.get_response().id)
                got.release()

            client = grpcclient.InferenceServerClient(srv.grpc_url)
            client.start_stream(callback=on_response)
            for rid, delay in (("slow", 400), ("fast", 0)):
                inp = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
                inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
                client.async_stream_infer(model, [inp], request_id=rid, parameters={"delay_ms": delay})
                time.sleep(0.05)
            for _ in range(2):
                assert got.acquire(timeout=30)
            client.stop_stream()
            client.close()
            assert order == expect, (model, order)
    finally:
        assert srv.terminate() == 0
