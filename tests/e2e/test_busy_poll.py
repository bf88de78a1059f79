"""``--busy-poll-us``: after traffic, the router's and frontend processes' event loops and a
single-threaded worker poll their sockets without sleeping for that long.

Checked through the real server with a long window (300 ms, so that the CPU it burns shows in
``/proc``): requests are answered as without it (HTTP and gRPC through a frontend process and
a lane, BLS over a lane, a decoupled model sending from its own thread); right after a request
the worker and the frontend process burn CPU, and once the window has passed they sleep
again; a worker whose model runs a thread of its own does not spin (that thread would wait a
whole GIL switch interval for each turn while the main thread spins)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.server import ROOT, ServerProcess, make_repository
from tests.e2e.test_frontend_processes import frontend_pids

pytestmark = pytest.mark.timeout(180)

WINDOW_US = 300_000
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "identity_fp32", "bls_identity", "repeat")
    srv = ServerProcess(repo, "--frontend-processes", "1", "--busy-poll-us", str(WINDOW_US)).start()
    time.sleep(0.5)  # the router publishes its lane routes to the frontend every 50 ms
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def burnt(pids: list[int], seconds: float) -> list[float]:
    """CPU seconds each of ``pids`` used over the next ``seconds``."""
    before = [cpu_s(p) for p in pids]
    time.sleep(seconds)
    return [cpu_s(p) - b for p, b in zip(pids, before, strict=True)]


def infer_http(srv: ServerProcess, model: str, data: np.ndarray) -> np.ndarray:
    with httpclient.InferenceServerClient(srv.url) as c:
        t = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        t.set_data_from_numpy(data)
        out = c.infer(model, [t]).as_numpy("OUTPUT0")
    assert out is not None
    return out


def test_answers_as_without_it(server: ServerProcess) -> None:
    data = np.arange(16, dtype=np.float32)
    for model in ("identity_fp32", "bls_identity"):
        np.testing.assert_array_equal(infer_http(server, model, data), data)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        t = grpcclient.InferInput("INPUT0", [16], "FP32")
        t.set_data_from_numpy(data * 2)
        np.testing.assert_array_equal(c.infer("identity_fp32", [t]).as_numpy("OUTPUT0"), data * 2)


def test_decoupled_model_sending_from_a_thread(server: ServerProcess) -> None:
    got: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        t = grpcclient.InferInput("IN", [500], "INT32")
        t.set_data_from_numpy(np.arange(500, dtype=np.int32))
        c.async_stream_infer("repeat", [t], parameters={"mode": "thread"})
        values = []
        for _ in range(500):
            result, error = got.get(timeout=30)
            assert error is None, error
            values.append(int(result.as_numpy("OUT")[0]))
        c.stop_stream()
    assert values == list(range(500))


def test_processes_poll_for_the_window_after_a_request_then_sleep(server: ServerProcess) -> None:
    worker = server.worker_pids("identity_fp32")[-1]
    frontends = frontend_pids(server)
    assert len(frontends) == 1
    pids = [worker, frontends[0]]
    time.sleep(WINDOW_US / 1e6 + 0.2)
    quiet = burnt(pids, 0.3)
    infer_http(server, "identity_fp32", np.ones(16, dtype=np.float32))
    busy = burnt(pids, WINDOW_US / 1e6)
    time.sleep(0.2)
    after = burnt(pids, 0.3)
    # a spinning process gets what the scheduler gives it (two busy processes on a loaded
    # 2-core box): a tenth of the window at least; a sleeping one next to nothing
    for name, q, b, a in zip(("worker", "frontend"), quiet, busy, after, strict=True):
        assert b >= WINDOW_US / 1e7, f"{name}: {b:.3f} s of CPU in the window after a request"
        assert q <= 0.05 and a <= 0.05, f"{name}: {q:.3f} s before, {a:.3f} s after the window"


def test_a_worker_with_a_thread_of_its_model_does_not_spin(server: ServerProcess) -> None:
    worker = server.worker_pids("repeat")[-1]
    got: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        time.sleep(WINDOW_US / 1e6 + 0.2)  # no window left from another test's request
        t = grpcclient.InferInput("IN", [20], "INT32")
        t.set_data_from_numpy(np.arange(20, dtype=np.int32))
        before = cpu_s(worker)
        start = time.monotonic()
        # "slow": the model's thread sends a response every 20 ms (0.4 s), its execute returned
        c.async_stream_infer("repeat", [t], parameters={"mode": "slow"})
        for _ in range(20):
            result, error = got.get(timeout=30)
            assert error is None, error
        used, wall = cpu_s(worker) - before, time.monotonic() - start
        c.stop_stream()
    assert used <= wall / 3, f"the worker used {used:.3f} s of CPU in {wall:.3f} s while its model's thread ran"


def test_a_negative_window_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.server", "serve", "--model-repository", str(tmp_path), "--busy-poll-us", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "--busy-poll-us must be >= 0" in proc.stderr, proc.stderr
