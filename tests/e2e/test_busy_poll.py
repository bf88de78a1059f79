"""``--busy-poll-us``: after traffic, the router's and frontend processes' event loops and a
worker poll their sockets without sleeping for that long.

Checked through the real server with a long window (300 ms, so that it shows in ``/proc``):
requests are answered as without it (HTTP and gRPC through a frontend process and a lane, BLS
over a lane, a decoupled model sending from its own thread); right after a request the main
threads of the worker and the frontend process stay runnable (state R), and once the window
has passed they sleep again; a worker whose model runs a thread of its own does not spin (that
thread would wait a whole GIL switch interval for each turn while the main thread spins)."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "identity_fp32", "bls_identity", "repeat")
    srv = ServerProcess(repo, "--frontend-processes", "1", "--busy-poll-us", str(WINDOW_US)).start()
    time.sleep(0.5)  # the router publishes its lane routes to the frontend every 50 ms
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread (where a worker and an event loop spin), as the
    scheduler counts them (``schedstat``, in ns: ``stat``'s ticks charge a tick to whoever
    runs at that moment, and a spinner that yields its core at every turn is rarely the one
    on a loaded machine)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def running(pids: list[int], seconds: float) -> list[float]:
    """The share of ``seconds`` each of ``pids``'s main thread (where a worker and an event
    loop spin) was running or runnable, sampled every 5 ms: a spinner is, whatever CPU a
    loaded machine gives it (it yields its core at every turn); a process waiting in
    ``poll``/``epoll_wait`` is not."""
    counts = [0] * len(pids)
    samples = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, pid in enumerate(pids):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                counts[i] += 1
        samples += 1
        time.sleep(0.005)
    return [c / samples for c in counts]


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
    quiet = running(pids, 0.3)
    infer_http(server, "identity_fp32", np.ones(16, dtype=np.float32))
    busy = running(pids, WINDOW_US / 1e6 - 0.05)
    time.sleep(0.2)
    after = running(pids, 0.3)
    for name, q, b, a in zip(("worker", "frontend"), quiet, busy, after, strict=True):
        assert b >= 0.5, f"{name}: running {b:.0%} of the window after a request"
        assert q <= 0.1 and a <= 0.1, f"{name}: running {q:.0%} before, {a:.0%} after the window"


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
