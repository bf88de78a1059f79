"""BLS calls over lanes (``workers.lanecalls``): a model's call to a model version the router
publishes goes straight to one of its workers, with the router's validation, statistics and
failure handling; a call that needs the router (a timeout, a batching target) still goes
through it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, served, wait_until
from tests.e2e.test_frontend_lanes import RouterStopped

pytestmark = pytest.mark.timeout(120)

MODELS = ("bls_relay", "bls_sync", "bls_many", "bls_flood", "add_sub", "identity_fp32", "slow", "batcher")
ROUTES_S = 0.3
"""Enough for the router to publish its routes (every 50 ms)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, MODELS)


def _relay(srv: ServerProcess, target: str, data: np.ndarray, timeout: float = 30.0, **params: object) -> np.ndarray:
    c = httpclient.InferenceServerClient(srv.url, network_timeout=timeout, connection_timeout=timeout)
    try:
        i0 = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        i0.set_data_from_numpy(data)
        name = httpclient.InferInput("MODEL_NAME", [1], "BYTES")
        name.set_data_from_numpy(np.array([target.encode()], dtype=np.object_))
        r = c.infer("bls_relay", [i0, name], parameters=params or None)
        out = r.as_numpy("OUTPUT0")
        assert out is not None
        return out
    finally:
        c.close()


def _reshaped(srv: ServerProcess, x: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """bls_reshape's answer: reshaper's OUTPUT0 flattened, the rank it saw, the answer's shape."""
    c = httpclient.InferenceServerClient(srv.url, network_timeout=30, connection_timeout=30)
    try:
        i = httpclient.InferInput("X", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        r = c.infer("bls_reshape", [i])
        return r.as_numpy("OUTPUT0"), int(r.as_numpy("SEEN_RANK")[0]), r.as_numpy("SHAPE").tolist()
    finally:
        c.close()


def _successes(srv: ServerProcess) -> int:
    """identity_fp32's successful requests so far (its statistics)."""
    s = requests.get(f"http://{srv.url}/v2/models/identity_fp32/stats", timeout=10).json()
    return int(s["model_stats"][0]["inference_stats"]["success"]["count"])


def _error(srv: ServerProcess, target: str, data: np.ndarray, **params: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        _relay(srv, target, data, **params)
    return str(info.value)


def test_calls_skip_the_router(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the router stopped, a client request reaches the BLS model over a frontend's lane
    and its call reaches the target over the caller's lane; a call that needs the router
    (here: a timeout) waits for it, so this test can fail. A call into a model whose input has
    a ``reshape`` goes over the lane reshaped, and its answer comes back in the caller's shape."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), "bls_relay", "identity_fp32", "bls_reshape", "reshaper")
    srv = ServerProcess(repo, "--frontend-processes", "1").start()
    try:
        small = np.arange(16, dtype=np.float32)
        large = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: through the arenas
        time.sleep(ROUTES_S)
        assert np.array_equal(_relay(srv, "identity_fp32", small), small)
        with RouterStopped(srv):
            for data in (small, large, small):
                assert np.array_equal(_relay(srv, "identity_fp32", data), data)
            out, rank, shape = _reshaped(srv, small[:6])
            assert np.array_equal(out, small[:6] + 1) and rank == 2 and shape == [1, 2, 3]
            try:
                _relay(srv, "identity_fp32", small, timeout=1.0, bls_timeout_us=10_000_000)
            except Exception as exc:  # noqa: BLE001 - the client's timeout, whatever its type
                assert not isinstance(exc, InferenceServerException), exc
                assert "timeout" in type(exc).__name__.lower() or "timed out" in str(exc), repr(exc)
            else:
                raise AssertionError("a call with a timeout was answered while the router was stopped")
        assert np.array_equal(_relay(srv, "identity_fp32", small, bls_timeout_us=10_000_000), small)
    finally:
        assert srv.terminate() == 0, srv.log
    assert not srv.segments()


@pytest.fixture(scope="module")
def with_frontends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(
        tmp_path_factory, ("bls_relay", "bls_many", "bls_flood", "identity_fp32"), "--frontend-processes", "1"
    )


@pytest.mark.parametrize("where", ["router", "frontends"])
def test_statistics_count_calls_at_once(server: ServerProcess, with_frontends: ServerProcess, where: str) -> None:
    """A client that reads statistics and metrics after its answers sees every call counted
    (the caller's answer goes to the router, or to a frontend process over its lane)."""
    if where == "frontends":
        server = with_frontends
    data = np.arange(8, dtype=np.float32)
    time.sleep(ROUTES_S)

    def stats() -> dict[str, int]:
        s = requests.get(f"http://{server.url}/v2/models/identity_fp32/stats", timeout=10).json()
        m = s["model_stats"][0]
        return {"ok": m["inference_stats"]["success"]["count"], "fail": m["inference_stats"]["fail"]["count"],
                "executions": m["execution_count"]}  # fmt: skip

    before = stats()
    for n in range(1, 21):
        assert np.array_equal(_relay(server, "identity_fp32", data), data)
        now = stats()
        assert now["ok"] - before["ok"] == n
        assert now["executions"] - before["executions"] == n
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    line = next(
        x for x in text.splitlines() if x.startswith("nv_inference_request_success{") and 'model="identity_fp32"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 20


@pytest.mark.parametrize("where", ["router", "frontends"])
def test_thousands_of_calls_in_one_execute(server: ServerProcess, with_frontends: ServerProcess, where: str) -> None:
    """1500 calls from one ``execute``: its answer arrives, every call is counted, and the
    worker's connection still carries the next request (their statistics once travelled as
    a message too large for the one buffer written ahead of the answer: the router read a
    frame head without its body and lost the answer and the connection's framing)."""
    if where == "frontends":
        server = with_frontends
    data = np.arange(8, dtype=np.float32)
    time.sleep(ROUTES_S)

    c = httpclient.InferenceServerClient(server.url, network_timeout=60, connection_timeout=60)
    try:
        before = _successes(server)
        for count in (1500, 1):
            i0 = httpclient.InferInput("INPUT0", [8], "FP32")
            i0.set_data_from_numpy(data)
            n = httpclient.InferInput("COUNT", [1], "INT32")
            n.set_data_from_numpy(np.array([count], dtype=np.int32))
            assert np.array_equal(c.infer("bls_many", [i0, n]).as_numpy("OUTPUT0"), data)
        assert _successes(server) - before == 1501
    finally:
        c.close()


@pytest.mark.parametrize("where", ["router", "frontends"])
@pytest.mark.parametrize(("mode", "n", "calls"), [("gather", 1000, 1000), ("threads", 100, 800)])
def test_many_calls_in_flight_from_one_execute(
    server: ServerProcess, with_frontends: ServerProcess, where: str, mode: str, n: int, calls: int
) -> None:
    """1000 ``async_exec`` calls in flight at once, or 8 threads of the model calling at once:
    every answer is its own call's, and every call is counted once."""
    if where == "frontends":
        server = with_frontends
    time.sleep(ROUTES_S)

    c = httpclient.InferenceServerClient(server.url, network_timeout=60, connection_timeout=60)
    try:
        before = _successes(server)
        i = httpclient.InferInput("N", [1], "INT32")
        i.set_data_from_numpy(np.array([n], dtype=np.int32))
        r = c.infer("bls_flood", [i], parameters={"mode": mode})
        assert r.as_numpy("OK").tolist() == [calls]
        assert _successes(server) - before == calls
    finally:
        c.close()


def test_errors_are_the_routers(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Validation over a lane gives the router's texts and codes, word for word."""
    data = np.arange(4, dtype=np.float32)
    time.sleep(ROUTES_S)
    cases = [
        lambda s: _error(s, "identity_fp32", data, bls_outputs="NOPE"),
        lambda s: _error(s, "add_sub", data),  # INPUT1 missing
        lambda s: _error(s, "add_sub", np.arange(3, dtype=np.float32)),
    ]
    over_lanes = [case(server) for case in cases]
    repo = make_repository(tmp_path_factory.mktemp("repo"), *MODELS)
    routed = ServerProcess(repo, "--frontend-lanes=false").start()
    try:
        through_router = [case(routed) for case in cases]
    finally:
        assert routed.terminate() == 0, routed.log
    assert over_lanes == through_router
    assert "unexpected inference output 'NOPE'" in over_lanes[0]
    assert "expected 2 inputs but got 1 inputs" in over_lanes[1]


def test_a_target_that_dies_fails_the_call(server: ServerProcess) -> None:
    data = np.arange(4, dtype=np.float32)
    time.sleep(ROUTES_S)
    pids = server.worker_pids("slow")
    assert pids
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_error, server, "slow", data, delay_ms=3000)
        time.sleep(1.0)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        message = fut.result(timeout=30)
    assert "died while executing the request" in message
    # the instances come back and serve calls again
    wait_until(lambda: len(server.worker_pids("slow")) >= 2 * len(pids), timeout_s=30)
    wait_until(lambda: _try(server, "slow", data), timeout_s=30)


def _try(srv: ServerProcess, target: str, data: np.ndarray) -> bool:
    try:
        return bool(np.array_equal(_relay(srv, target, data), data))
    except InferenceServerException:
        return False


def test_calls_in_parallel_from_many_clients(server: ServerProcess) -> None:
    """64 clients at once through one caller instance and two target instances."""
    time.sleep(ROUTES_S)

    def one(i: int) -> bool:
        data = np.full(8 + i % 5, float(i), dtype=np.float32)
        return bool(np.array_equal(_relay(server, "slow", data), data))

    with ThreadPoolExecutor(64) as pool:
        assert all(pool.map(one, range(256)))
