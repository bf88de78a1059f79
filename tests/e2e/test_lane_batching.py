"""A dynamic-batching model's lane requests batched by its worker (``workers.lanebatch``):
batches form as the router's batcher would form them (preferred size, shapes, max batch
size), while the router is stopped, and the statistics count executions and requests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, at_once, served
from tests.e2e.test_frontend_lanes import RouterStopped

pytestmark = pytest.mark.timeout(120)

ROUTES_S = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("lane_batcher",), "--frontend-processes", "2")


def _infer(srv: ServerProcess, data: np.ndarray) -> tuple[np.ndarray, int]:
    c = httpclient.InferenceServerClient(srv.url, network_timeout=30)
    try:
        i = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        i.set_data_from_numpy(data)
        r = c.infer("lane_batcher", [i])
        out, n = r.as_numpy("OUTPUT0"), r.as_numpy("REQUESTS")
        assert out is not None and n is not None
        return out, int(n[0][0])
    finally:
        c.close()


def _together(srv: ServerProcess, arrays: list[np.ndarray]) -> list[int]:
    """Send ``arrays`` at once; each answer's REQUESTS (checking its data)."""
    got: list[int] = [0] * len(arrays)

    def one(k: int) -> None:
        out, got[k] = _infer(srv, arrays[k])
        assert np.array_equal(out, arrays[k])

    at_once(len(arrays), one)
    return got


def _stats(srv: ServerProcess) -> dict[str, object]:
    s = requests.get(f"http://{srv.url}/v2/models/lane_batcher/stats", timeout=10).json()
    return s["model_stats"][0]  # type: ignore[no-any-return]


def test_the_worker_batches_up_to_the_preferred_size(server: ServerProcess) -> None:
    time.sleep(ROUTES_S)
    before = _stats(server)
    data = [np.full((1, 4), float(k), dtype=np.float32) for k in range(4)]
    with RouterStopped(server):  # lanes only: the router's batcher cannot have formed them
        got = _together(server, data)
    assert got == [4, 4, 4, 4]
    after = _stats(server)
    assert after["execution_count"] - before["execution_count"] == 1  # type: ignore[operator]
    assert after["inference_count"] - before["inference_count"] == 4  # type: ignore[operator]
    ok = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]  # type: ignore[index]
    assert ok == 4
    queued = after["inference_stats"]["queue"]["count"] - before["inference_stats"]["queue"]["count"]  # type: ignore[index]
    assert queued == 4
    assert after["inference_stats"]["queue"]["ns"] > before["inference_stats"]["queue"]["ns"]  # type: ignore[index]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}  # type: ignore[attr-defined]
    assert sizes.get(4, 0) >= 1


def test_batches_keep_to_max_batch_size_and_shapes(server: ServerProcess) -> None:
    time.sleep(ROUTES_S)
    # rows: 3 + 3 + 3 exceed max_batch_size 8 together: at most two of them share a batch
    got = _together(server, [np.ones((3, 4), dtype=np.float32) * k for k in range(3)])
    assert sorted(got) in ([1, 2, 2], [1, 1, 1]), got
    # different shapes never share a batch
    arrays = [np.ones((1, 4), dtype=np.float32), np.ones((1, 4), dtype=np.float32),
              np.ones((1, 6), dtype=np.float32), np.ones((1, 6), dtype=np.float32)]  # fmt: skip
    got = _together(server, arrays)
    assert all(n <= 2 for n in got), got


def test_a_priority_goes_to_the_router_which_checks_it(server: ServerProcess) -> None:
    time.sleep(ROUTES_S)
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    r = requests.post(f"http://{server.url}/v2/models/lane_batcher/infer",
                      json={**body, "parameters": {"priority": "high"}}, timeout=30)  # fmt: skip
    assert r.status_code == 400
    assert "'priority' must be a non-negative integer" in r.json()["error"]
    r = requests.post(f"http://{server.url}/v2/models/lane_batcher/infer", json=body, timeout=30)
    assert r.status_code == 200


@pytest.fixture(scope="module")
def big_inline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("lane_batcher",), "--frontend-processes", "1", "--inline-max-bytes", "1048576")


def test_small_and_large_answers_of_one_batch_reach_their_clients(big_inline: ServerProcess) -> None:
    """A worker writes a batch's small answers to a lane together, and a large one (over
    ``outbox.JOIN_MAX``: 80 KB inline) after the ones before it: with one frontend every
    answer of the batch goes to the same lane, half asking for the large output and half
    only for REQUESTS. Each client gets its own answer whole."""
    time.sleep(ROUTES_S)

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(big_inline.url, network_timeout=30)
        try:
            data = np.full((1, 20000), float(k), dtype=np.float32)
            i = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
            i.set_data_from_numpy(data)
            names = ["REQUESTS", "OUTPUT0"] if k % 2 else ["REQUESTS"]
            r = c.infer("lane_batcher", [i], outputs=[httpclient.InferRequestedOutput(n) for n in names])
            n = r.as_numpy("REQUESTS")
            assert n is not None and int(n[0][0]) > 1, "not batched"
            out = r.as_numpy("OUTPUT0")
            if k % 2:
                assert out is not None and np.array_equal(out, data)
            else:
                assert out is None
        finally:
            c.close()

    with RouterStopped(big_inline):
        at_once(8, one)


@pytest.fixture(scope="module")
def small_arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # a worker's outputs may use 16 segments of 256 KiB: 4 MiB
    args = ("--frontend-processes", "1", "--worker-arena-bytes", "262144")
    yield from served(tmp_path_factory, ("lane_batcher",), *args)


def test_output_blocks_of_lane_batches_go_back_to_the_worker(small_arena: ServerProcess) -> None:
    """Batched lane answers with outputs in the worker's arena (80 KB, over the inline
    limit): the lane holds each block until its client releases it, and the worker frees it
    then. 12 rounds of 8 (7.7 MB) pass through an arena of 4 MiB only if they do."""
    time.sleep(ROUTES_S)
    with RouterStopped(small_arena):
        for r in range(12):
            got = _together(small_arena, [np.full((1, 20000), float(8 * r + k), dtype=np.float32) for k in range(8)])
            assert max(got) > 1, "not batched"
