"""Crash isolation, restart, graceful shutdown, stale shared memory, broken models, CLI."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.conftest import PLANTED
from tests.e2e.server import ROOT, ServerProcess, make_repository


def slow_input(n: int = 4) -> httpclient.InferInput:
    i = httpclient.InferInput("INPUT0", [n], "FP32")
    i.set_data_from_numpy(np.arange(n, dtype=np.float32))
    return i


def crashy_input(value: int) -> httpclient.InferInput:
    i = httpclient.InferInput("INPUT0", [1], "INT32")
    i.set_data_from_numpy(np.array([value], dtype=np.int32))
    return i


def add_sub_ok(c: httpclient.InferenceServerClient) -> bool:
    i0 = httpclient.InferInput("INPUT0", [4], "FP32")
    i0.set_data_from_numpy(np.ones(4, np.float32))
    i1 = httpclient.InferInput("INPUT1", [4], "FP32")
    i1.set_data_from_numpy(np.ones(4, np.float32))
    return bool((c.infer("add_sub", [i0, i1]).as_numpy("OUTPUT0") == 2).all())


def post_json(server: ServerProcess, model: str, body: dict[str, object]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=json.dumps(body).encode())
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def wait_ready(c: httpclient.InferenceServerClient, model: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if c.is_model_ready(model):
            return
        time.sleep(0.05)
    raise AssertionError(f"{model} never became ready again")


@pytest.fixture
def crash_server(tmp_path: Path, fresh_server: list[ServerProcess]) -> ServerProcess:
    repo = make_repository(tmp_path / "repo", "crashy", "slow", "add_sub")
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    return srv


@pytest.mark.parametrize(
    ("value", "signature"),
    [(1, "killed by signal SIGKILL"), (2, "killed by signal SIGSEGV"), (4, "exited with status 3")],
)
def test_worker_death_fails_only_its_request(crash_server: ServerProcess, value: int, signature: str) -> None:
    c = crash_server.client()
    with pytest.raises(InferenceServerException) as info:
        c.infer("crashy", [crashy_input(value)])
    assert info.value.status() == "503"
    msg = str(info.value)
    assert "model 'crashy'" in msg and "instance 'crashy_0'" in msg and signature in msg
    assert add_sub_ok(c)  # other models untouched
    wait_ready(c, "crashy")
    assert c.infer("crashy", [crashy_input(0)]).as_numpy("OUTPUT0")[0] == 0
    assert crash_server.terminate() == 0
    assert not crash_server.segments()


def _outstanding(server: ServerProcess, model: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/v2/admin/workers")
        workers = json.loads(conn.getresponse().read())["workers"]
    finally:
        conn.close()
    return sum(int(w["outstanding"]) for w in workers if w["model"] == model)


def test_worker_killed_mid_request_and_readiness_gap(crash_server: ServerProcess, tmp_path: Path) -> None:
    c = crash_server.client()
    # the replacement's load waits while this file exists: the readiness gap cannot close
    # before it is checked (it did once on a loaded machine, when the check came late)
    hold = tmp_path / "repo" / "crashy" / "hold_load"
    hold.touch()
    (pid,) = crash_server.worker_pids("crashy")
    result: dict[str, object] = {}

    def call() -> None:
        # plain http.client: tritonclient's gevent hub must not be used from a second thread
        result["status"], result["body"] = post_json(
            crash_server,
            "crashy",
            {
                "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1], "data": [6]}]  # sleeps 5 s
            },
        )

    t = threading.Thread(target=call)
    t.start()
    # kill once the request is on the worker (a fixed sleep raced with a loaded machine: the
    # kill could come before the request, which then found no ready instance or the new one)
    deadline = time.monotonic() + 10
    while _outstanding(crash_server, "crashy") == 0:
        assert time.monotonic() < deadline, "the request never reached the worker"
        time.sleep(0.01)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(10)
    assert time.monotonic() - started < 3.0, "the in-flight request was not failed promptly (it sleeps 5 s)"
    assert result["status"] == 503, result
    assert "SIGKILL" in str(result["body"])
    # one instance, restarting: the model is not ready until the new worker has loaded
    assert not c.is_model_ready("crashy")
    hold.unlink()
    wait_ready(c, "crashy")
    assert len(crash_server.worker_pids("crashy")) == 2
    assert crash_server.terminate() == 0


async def slow_call(c: aioclient.InferenceServerClient, delay_ms: int = 1500) -> object:
    """One request to ``slow`` taking ``delay_ms``: its output, or the error it got."""
    i = aioclient.InferInput("INPUT0", [4], "FP32")
    i.set_data_from_numpy(np.arange(4, dtype=np.float32))
    try:
        r = await c.infer("slow", [i], parameters={"delay_ms": delay_ms})
        return r.as_numpy("OUTPUT0")
    except InferenceServerException as exc:
        return exc


def test_sigterm_lets_inflight_requests_finish(crash_server: ServerProcess) -> None:
    async def go() -> list[object]:
        async with aioclient.InferenceServerClient(crash_server.url) as c:
            tasks = [asyncio.ensure_future(slow_call(c)) for _ in range(4)]
            await asyncio.sleep(0.5)
            assert crash_server.proc is not None
            crash_server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    for r in results:
        assert isinstance(r, np.ndarray), r
        np.testing.assert_array_equal(r, np.arange(4, dtype=np.float32))
    assert crash_server.terminate() == 0
    assert not crash_server.segments()
    assert "server stopped" in crash_server.log


def test_sigterm_to_the_whole_process_group(crash_server: ServerProcess) -> None:
    """SIGTERM to the router and every worker at once, as a terminal, ``timeout`` or systemd's
    default KillMode sends it to a process group: the workers find the router's stop mark
    (``proto.stopmark``) and go on serving while it drains, so the two requests waiting for a
    worker are answered too (before, each worker exited after its batch, was restarted and
    logged as a crash, and the waiting requests failed); then the router stops them."""

    async def go() -> list[object]:
        async with aioclient.InferenceServerClient(crash_server.url) as c:
            tasks = [asyncio.ensure_future(slow_call(c)) for _ in range(4)]  # two instances: two run, two wait
            await asyncio.sleep(0.5)
            group = [crash_server.pid, *crash_server.children()]
            assert len(group) == 5, group  # the router, crashy, two of slow, add_sub
            for pid in group:
                os.kill(pid, signal.SIGTERM)
            return await asyncio.gather(*tasks)

    started = time.monotonic()
    results = asyncio.run(go())
    for r in results:
        assert isinstance(r, np.ndarray), results
        np.testing.assert_array_equal(r, np.arange(4, dtype=np.float32))
    assert crash_server.terminate() == 0
    assert time.monotonic() - started < 15
    assert "restarting" not in crash_server.log, crash_server.log
    assert " ERROR " not in crash_server.log, crash_server.log
    assert "while the server stops" not in crash_server.log, crash_server.log  # the router stopped each
    assert not crash_server.segments()


def test_a_worker_that_dies_while_the_server_stops_is_not_replaced(crash_server: ServerProcess) -> None:
    """A worker killed while the router drains (here SIGKILL, just after the router's
    SIGTERM) is not restarted: its request fails, the other worker's is answered, and the
    log says so at INFO."""

    async def go() -> list[object]:
        async with aioclient.InferenceServerClient(crash_server.url) as c:
            tasks = [asyncio.ensure_future(slow_call(c)) for _ in range(2)]  # one on each instance
            await asyncio.sleep(0.5)
            assert crash_server.proc is not None
            crash_server.proc.send_signal(signal.SIGTERM)
            crash_server.wait_log("received SIGTERM; shutting down")
            [victim] = crash_server.worker_pids("slow")[:1]
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert sum(isinstance(r, np.ndarray) for r in results) == 1, results
    assert sum(isinstance(r, InferenceServerException) for r in results) == 1, results
    assert crash_server.terminate() == 0
    assert "ended while the server stops (died: killed by signal SIGKILL); not restarted" in crash_server.log
    assert "restarting" not in crash_server.log, crash_server.log
    assert not crash_server.segments()


def test_exit_timeout_bounds_shutdown(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "slow")
    srv = ServerProcess(repo, "--exit-timeout-secs", "1").start()
    fresh_server.append(srv)
    outcome: list[object] = []

    def call() -> None:
        try:
            status, _ = post_json(
                srv,
                "slow",
                {
                    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                    "parameters": {"delay_ms": 20000},
                },
            )
            outcome.append(status)
        except OSError as exc:  # the server closed the connection: the expected outcome
            outcome.append(exc)

    t = threading.Thread(target=call)
    t.start()
    srv.wait_log(r"model 'slow' version 1 ready")
    time.sleep(0.5)
    started = time.monotonic()
    assert srv.terminate(timeout_s=30) == 0
    assert time.monotonic() - started < 15
    t.join(30)
    assert outcome and outcome[0] != 200, "the 20 s request cannot have succeeded"
    assert not srv.segments()


@pytest.mark.exclusive  # plants a dead run's segment: another test's server start would reclaim it
def test_stale_segments_are_reclaimed(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"shoal_{dead.pid}_{PLANTED}_in_0"
    Path("/dev/shm", stale).write_bytes(b"x" * 100)
    try:
        repo = make_repository(tmp_path / "repo", "add_sub")
        srv = ServerProcess(repo).start()
        fresh_server.append(srv)
        assert not Path("/dev/shm", stale).exists()
        assert "left by a server that is gone" in srv.log
        assert srv.terminate() == 0
    finally:
        Path("/dev/shm", stale).unlink(missing_ok=True)


def test_broken_model_does_not_stop_the_others(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    (repo / "broken").mkdir()
    (repo / "broken" / "config.pbtxt").write_text('backend: "python"\ninput [ { name: "X" } ]\n')
    (repo / "failing").mkdir()
    (repo / "failing" / "1").mkdir()
    (repo / "failing" / "config.pbtxt").write_text(
        'backend: "python"\ninput [ { name: "X", data_type: TYPE_FP32, dims: [1] } ]\n'
        'output [ { name: "Y", data_type: TYPE_FP32, dims: [1] } ]\n'
    )
    (repo / "failing" / "1" / "model.py").write_text("raise ImportError('this model cannot load')\n")
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    c = srv.client()
    assert add_sub_ok(c)
    assert not c.is_model_ready("broken")
    assert not c.is_model_ready("failing")
    assert not c.is_server_ready()  # strict readiness: every model must be ready
    assert "this model cannot load" in srv.log
    assert "'broken'" in srv.log
    # the model's traceback once (the Python backend logs it), then the worker's one line
    assert srv.log.count("\nImportError: this model cannot load\n") == 1, srv.log
    assert "loading failing failed: model 'failing': failed to load Python model: ImportError" in srv.log
    assert srv.terminate() == 0

    relaxed = ServerProcess(repo, "--strict-readiness", "false").start()
    fresh_server.append(relaxed)
    assert relaxed.client().is_server_ready()
    assert relaxed.terminate() == 0


def test_bad_command_line_reports_every_problem(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.server",
            "serve",
            "--model-repository",
            str(tmp_path / "missing"),
            "--http-port",
            "70000",
            "--model-control-mode",
            "bogus",
            "--exit-timeout-secs",
            "-1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    for needle in ("not a directory", "--http-port 70000", "bogus", "--exit-timeout-secs"):
        assert needle in proc.stderr, proc.stderr


def test_many_concurrent_requests(server: ServerProcess) -> None:
    n = 256

    async def go() -> None:
        async with aioclient.InferenceServerClient(server.url, conn_limit=64) as c:

            async def one(k: int) -> None:
                data = np.full(8, k, dtype=np.float32)
                i = aioclient.InferInput("INPUT0", [8], "FP32")
                i.set_data_from_numpy(data)
                r = await c.infer("identity_fp32", [i])
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)

            await asyncio.gather(*(one(k) for k in range(n)))

    asyncio.run(go())


def test_idle_grpc_stream_does_not_hold_shutdown(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """A client that keeps a gRPC stream open (as sequence clients do) must not keep the
    server from exiting for the whole --exit-timeout-secs once no request is in flight."""
    import tritonclient.grpc as grpcclient

    repo = make_repository(tmp_path / "repo", "identity_fp32")
    srv = ServerProcess(repo, "--exit-timeout-secs", "30").start()
    fresh_server.append(srv)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    got = threading.Event()

    def on_response(result: object, error: object) -> None:
        got.set()

    client.start_stream(callback=on_response)
    i = grpcclient.InferInput("INPUT0", [2], "FP32")
    i.set_data_from_numpy(np.ones(2, dtype=np.float32))
    client.async_stream_infer("identity_fp32", [i])
    assert got.wait(30)
    start = time.monotonic()
    try:
        assert srv.terminate() == 0
        assert time.monotonic() - start < 10
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("frontends", [(), ("--frontend-processes", "2")], ids=["router", "frontends"])
def test_a_long_tmpdir_moves_the_run_folder_to_tmp(
    tmp_path: Path, fresh_server: list[ServerProcess], frontends: tuple[str, ...]
) -> None:
    """A TMPDIR so long that the run folder's Unix sockets could not be bound under it (the
    server stopped at start with "OSError: AF_UNIX path too long" and a traceback): the run
    folder goes to /tmp, and requests reach the workers, over lanes too."""
    long_tmp = tmp_path / ("x" * 60) / ("y" * 50)
    long_tmp.mkdir(parents=True)
    repo = make_repository(tmp_path / "repo", "identity_fp32")
    srv = ServerProcess(repo, *frontends, env={"TMPDIR": str(long_tmp)})
    fresh_server.append(srv)
    srv.start()
    time.sleep(0.3)  # the routes reach the frontends
    data = np.arange(16, dtype=np.float32)
    for _ in range(4):
        inp = httpclient.InferInput("INPUT0", [16], "FP32")
        inp.set_data_from_numpy(data)
        assert np.array_equal(srv.client().infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), data)
    assert len(list(Path("/tmp").glob(f"shoal_{srv.pid}_*"))) == 1
    assert not list(long_tmp.iterdir())
    assert srv.terminate() == 0, srv.log[-3000:]
