"""Lanes (``server/frontproc/lanes.py``): with frontend processes, requests of a model with no
scheduling of its own go from the frontend straight to a worker and back, never crossing the
router. Proven by stopping the router (SIGSTOP) while such requests are answered; then the
statistics and metrics the router keeps for them, large tensors through the arenas, a worker
killed while it executes a lane request, a client that goes away, and unloading a model
while lane requests run (each request is answered: what a stopping worker did not take goes
through the router)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until

pytestmark = pytest.mark.timeout(180)

MODELS = ("identity_fp32", "slow", "cancellable", "add_sub", "batcher")
FRONTENDS = ("--frontend-processes", "2")
SMALL_ARENAS = ("--worker-arena-bytes", str(4 << 20), "--shm-arena-bytes", str(4 << 20))
"""A worker's output arena is then 64 MiB at most: outputs of 1 MiB never given back exhaust
it after ~64 requests."""
ROUTES_S = 0.5
"""Enough for the router to publish its routes (every 50 ms) to the frontends."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), *MODELS)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        repo, *FRONTENDS, *SMALL_ARENAS, "--model-control-mode", "explicit", "--load-model", "*"
    ).start()
    time.sleep(ROUTES_S)
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


def _infer_http(srv: ServerProcess, data: np.ndarray, model: str = "identity_fp32", timeout: float = 10.0,
                params: dict[str, object] | None = None) -> np.ndarray:  # fmt: skip
    with httpclient.InferenceServerClient(srv.url, network_timeout=timeout, connection_timeout=timeout) as c:
        t = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        t.set_data_from_numpy(data)
        result = c.infer(model, [t], parameters=params)
        out = result.as_numpy("OUTPUT0")
        assert out is not None
        return out


def _infer_grpc(
    srv: ServerProcess, data: np.ndarray, model: str = "identity_fp32", timeout: float = 10.0
) -> np.ndarray:
    with grpcclient.InferenceServerClient(srv.grpc_url) as c:
        t = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        t.set_data_from_numpy(data)
        out = c.infer(model, [t], client_timeout=timeout).as_numpy("OUTPUT0")
        assert out is not None
        return out


class RouterStopped:
    """The router process stopped (SIGSTOP) for the ``with`` block; its children run on."""

    def __init__(self, srv: ServerProcess) -> None:
        self.pid = srv.pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def test_requests_are_answered_while_the_router_is_stopped(server: ServerProcess) -> None:
    data = np.arange(16, dtype=np.float32)
    with RouterStopped(server):
        for _ in range(5):  # fresh connections: both frontend processes answer
            assert np.array_equal(_infer_http(server, data), data)
            assert np.array_equal(_infer_grpc(server, data), data)


def test_without_lanes_the_router_answers(repo: Path) -> None:
    """The check above can fail: with ``--frontend-lanes=false`` a stopped router answers nothing."""
    srv = ServerProcess(repo, *FRONTENDS, "--frontend-lanes=false", "--load-model", "identity_fp32",
                        "--model-control-mode", "explicit").start()  # fmt: skip
    try:
        time.sleep(ROUTES_S)
        data = np.arange(16, dtype=np.float32)
        with RouterStopped(srv), pytest.raises(Exception):  # noqa: B017, PT011 - a timeout of either kind
            _infer_http(srv, data, timeout=1.0)
        assert np.array_equal(_infer_http(srv, data), data)
    finally:
        assert srv.terminate() == 0, srv.log


def test_what_needs_the_router_goes_through_it(server: ServerProcess) -> None:
    """A dynamically batched model, and a request with a ``timeout``, wait for the router:
    stopped, it answers neither; resumed, both are answered."""
    data = np.ones((1, 4), dtype=np.float32)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with RouterStopped(server):
            batched = pool.submit(_infer_http, server, data, "batcher", 20.0)
            timed = pool.submit(_infer_http, server, data[0], "identity_fp32", 20.0, {"timeout": 10_000_000})
            done, _ = concurrent.futures.wait([batched, timed], timeout=1.0)
            assert not done
        assert np.array_equal(batched.result(timeout=15), data)
        assert np.array_equal(timed.result(timeout=15), data[0])


def test_a_request_the_lane_gives_back_reaches_the_router_as_sent(tmp_path: Path) -> None:
    """A lane that cannot be reached (its socket file is gone) sends the request through the
    router, which validates it as the client sent it: the frontend's validation had applied
    the model's ``reshape`` to it, and had fixed the version."""
    repo = make_repository(tmp_path / "repo", "reshaper")
    config = repo / "reshaper" / "config.pbtxt"
    config.write_text(config.read_text().replace("dynamic_batching { max_queue_delay_microseconds: 20000 }", ""))
    srv = ServerProcess(repo, *FRONTENDS).start()
    try:
        time.sleep(ROUTES_S)
        sockets = list(srv.run_dir().glob("lane-*.sock"))
        assert sockets
        for path in sockets:
            path.unlink()
        data = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
        for _ in range(4):  # both frontend processes
            with httpclient.InferenceServerClient(srv.url) as c:
                t = httpclient.InferInput("INPUT0", [1, 2, 3], "FP32")
                t.set_data_from_numpy(data)
                out = c.infer("reshaper", [t]).as_numpy("OUTPUT0")
                assert out is not None and np.array_equal(out, data + 1)
    finally:
        assert srv.terminate() == 0, srv.log


def _stats(srv: ServerProcess, model: str) -> dict[str, object]:
    r = requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10)
    r.raise_for_status()
    (s,) = r.json()["model_stats"]
    return dict(s)


def _metric(srv: ServerProcess, name: str, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_statistics_and_metrics_count_lane_requests(server: ServerProcess) -> None:
    before = _stats(server, "add_sub")
    success_before = _metric(server, "nv_inference_request_success", "add_sub")
    a = np.ones(4, dtype=np.float32)
    with RouterStopped(server):  # only lanes answer: these requests never reach the router
        with httpclient.InferenceServerClient(server.url) as hc:
            for _ in range(7):
                ins = [httpclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
                for t in ins:
                    t.set_data_from_numpy(a)
                out = hc.infer("add_sub", ins).as_numpy("OUTPUT0")
                assert out is not None and np.array_equal(out, a + a)
    after = _stats(server, "add_sub")
    assert after["inference_count"] == before["inference_count"] + 7  # type: ignore[operator]
    assert after["execution_count"] == before["execution_count"] + 7  # type: ignore[operator]
    inf_before, inf_after = before["inference_stats"], after["inference_stats"]
    for key in ("success", "compute_input", "compute_infer", "compute_output"):
        assert inf_after[key]["count"] == inf_before[key]["count"] + 7, key  # type: ignore[index]
    assert inf_after["success"]["ns"] > inf_before["success"]["ns"]  # type: ignore[index]
    assert _metric(server, "nv_inference_request_success", "add_sub") == success_before + 7


def test_large_tensors_through_the_arenas(server: ServerProcess) -> None:
    """1 MiB in and out, 100 times: inputs go in the frontend's arena, outputs come in the
    worker's and are given back over the lane (else its 64 MiB arena runs out)."""
    data = np.random.default_rng(1).random(1 << 18, dtype=np.float32)
    with RouterStopped(server):
        with httpclient.InferenceServerClient(server.url) as hc:
            for i in range(100):
                t = httpclient.InferInput("INPUT0", [1 << 18], "FP32")
                t.set_data_from_numpy(data + i)
                out = hc.infer("identity_fp32", [t]).as_numpy("OUTPUT0")
                assert out is not None and np.array_equal(out, data + i), i


def test_a_worker_killed_during_a_lane_request(server: ServerProcess) -> None:
    """The frontend fails the request itself (the router is stopped); then the router
    restarts the worker and requests are answered again."""
    data = np.ones(4, dtype=np.float32)
    pids = server.worker_pids("slow")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with RouterStopped(server):
            fut = pool.submit(_infer_http, server, data, "slow", 20.0, {"delay_ms": 5000})
            time.sleep(1.0)
            for pid in pids[-2:]:
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(InferenceServerException) as err:
                fut.result(timeout=10)
        assert "died while executing the request" in str(err.value)
    wait_until(lambda: len(server.worker_pids("slow")) >= len(pids) + 2, timeout_s=60)

    def answers() -> bool:
        try:
            return bool(np.array_equal(_infer_http(server, data, "slow"), data))
        except InferenceServerException:
            return False

    wait_until(answers, timeout_s=30)


def test_a_client_that_goes_away_cancels_its_lane_request(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "cancelled"
    body = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "parameters": {"marker": str(marker)},
    }
    with RouterStopped(server):
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"http://{server.url}/v2/models/cancellable/infer", data=json.dumps(body), timeout=0.5)
        wait_until(marker.exists, timeout_s=8)


def test_unloading_a_model_while_lane_requests_run(server: ServerProcess) -> None:
    """Every request gets an answer (the result, or the error of a model that is not there);
    none hangs or reports a dead worker; loaded again, the model answers over lanes."""
    data = np.arange(8, dtype=np.float32)
    stop = threading.Event()
    outcomes: list[str] = []

    def hammer() -> None:
        with httpclient.InferenceServerClient(server.url, network_timeout=20) as hc:
            while not stop.is_set():
                t = httpclient.InferInput("INPUT0", [8], "FP32")
                t.set_data_from_numpy(data)
                try:
                    out = hc.infer("identity_fp32", [t]).as_numpy("OUTPUT0")
                    outcomes.append("ok" if out is not None and np.array_equal(out, data) else "wrong")
                except InferenceServerException as exc:
                    outcomes.append(str(exc))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.5)
        with httpclient.InferenceServerClient(server.url) as admin:
            admin.unload_model("identity_fp32")
            time.sleep(0.5)
            admin.load_model("identity_fp32")
        time.sleep(ROUTES_S)
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert outcomes.count("ok") > 10, outcomes[:5]
    errors = {o for o in outcomes if o != "ok"}
    for e in errors:
        assert "died" not in e and "wrong" not in e and "timed out" not in e, e
        assert "identity_fp32" in e, e
    data2 = np.arange(16, dtype=np.float32)
    with RouterStopped(server):
        assert np.array_equal(_infer_http(server, data2), data2)
