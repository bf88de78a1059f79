"""Hangs and lost instances: stopped or stuck workers are killed and replaced, requests
have deadlines, a worker that cannot be started is reported (never a hung load), and
loading names that are not in the repository leaves no trace."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository
from tests.security.conftest import ADD_SUB, GoodClient, limited, request, wait_for


def hang_body(mode: int) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1], "data": [mode]}]}).encode()


def infer_hang(port: int, mode: int, timeout_s: float = 60) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    code, body = request(port, "POST", "/v2/models/hang/infer", hang_body(mode), timeout_s=timeout_s)
    return code, body, time.monotonic() - t0


@pytest.fixture
def hang_repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo", "hang", "add_sub", "slow")


def _replaced(srv: ServerProcess, old_pid: int) -> int:
    def new_pid() -> int:
        pids = srv.worker_pids("hang")
        return pids[-1] if pids and pids[-1] != old_pid else 0

    return int(wait_for(new_pid, timeout_s=30))


def test_stopped_worker_is_killed_and_replaced(hang_repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(hang_repo, "--worker-heartbeat-timeout-secs", "2").start()
    fresh.append(srv)
    assert infer_hang(srv.port, 0)[0] == 200
    pid = srv.worker_pids("hang")[0]
    os.kill(pid, signal.SIGSTOP)
    with GoodClient(srv.port) as good:
        code, body, took = infer_hang(srv.port, 0)
    good.check()
    assert code == 503, body
    assert "model 'hang' version 1 instance 'hang_0'" in body["error"] and "stopped answering" in body["error"]
    assert 1.5 < took < 10
    new = _replaced(srv, pid)
    assert new != pid
    wait_for(lambda: infer_hang(srv.port, 0)[0] == 200)


def test_worker_holding_the_gil_is_killed_and_replaced(hang_repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(hang_repo, "--worker-heartbeat-timeout-secs", "2").start()
    fresh.append(srv)
    assert infer_hang(srv.port, 0)[0] == 200
    pid = srv.worker_pids("hang")[0]
    with GoodClient(srv.port) as good:
        code, body, took = infer_hang(srv.port, 1)
    good.check()
    assert code == 503 and "no heartbeat" in body["error"] and "instance 'hang_0'" in body["error"], body
    assert took < 10
    assert _replaced(srv, pid) != pid
    wait_for(lambda: infer_hang(srv.port, 0)[0] == 200)


def test_server_deadline_and_a_stalled_batch(hang_repo: Path, fresh: list[ServerProcess]) -> None:
    """--request-timeout-secs 1: a request stuck in a backend that released the GIL fails
    after 1 s with 504 naming the instance; once the batch has been unanswered for twice
    that, the worker is killed and replaced."""
    srv = limited(hang_repo, "--request-timeout-secs", "1").start()
    fresh.append(srv)
    assert infer_hang(srv.port, 0)[0] == 200
    pid = srv.worker_pids("hang")[0]
    code, body, took = infer_hang(srv.port, 2)
    assert code == 504, body
    assert "deadline of 1 s" in body["error"] and "instance 'hang_0' is still executing it" in body["error"]
    assert 0.9 < took < 3
    assert _replaced(srv, pid) != pid
    srv.wait_log(r"a batch unanswered for \d+ s\)?: killed and restarted|a batch unanswered")
    wait_for(lambda: infer_hang(srv.port, 0)[0] == 200)


def test_client_timeout_never_kills_a_worker(hang_repo: Path, fresh: list[ServerProcess]) -> None:
    """The request parameter ``timeout`` (microseconds) ends that request only; the worker
    finishes its batch and keeps serving."""
    srv = limited(hang_repo).start()
    fresh.append(srv)
    slow = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "parameters": {"delay_ms": 1500, "timeout": 300_000},
    }
    t0 = time.monotonic()
    code, body = request(srv.port, "POST", "/v2/models/slow/infer", json.dumps(slow).encode())
    assert code == 504 and "deadline of 0.3 s" in body["error"] and "slow_" in body["error"], body
    assert time.monotonic() - t0 < 1.4
    pids = srv.worker_pids("slow")
    bad = {"inputs": slow["inputs"], "parameters": {"timeout": -5}}
    code, body = request(srv.port, "POST", "/v2/models/slow/infer", json.dumps(bad).encode())
    assert code == 400 and "'timeout'" in body["error"]
    time.sleep(1.5)
    assert request(srv.port, "POST", "/v2/models/add_sub/infer", ADD_SUB)[0] == 200
    assert srv.worker_pids("slow") == pids and "died" not in srv.log
    # gRPC: the client's deadline ends the call; the server serves on
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", [1], "FP32")
        inp.set_data_from_numpy(np.ones(1, np.float32))
        with pytest.raises(InferenceServerException) as err:
            g.infer("slow", [inp], parameters={"delay_ms": 1500}, client_timeout=0.3)
        assert "DEADLINE" in str(err.value.status())
    finally:
        g.close()
    assert request(srv.port, "POST", "/v2/models/add_sub/infer", ADD_SUB)[0] == 200


def test_worker_that_cannot_be_started(hang_repo: Path, tmp_path: Path, fresh: list[ServerProcess]) -> None:
    """The interpreter that runs workers is missing: a load fails at once naming why (it
    does not hang holding the model), and readiness says so; a worker killed then is
    retried with backoff (logged, in the index) and comes back once it can start."""
    python = tmp_path / "python"
    launcher = tmp_path / "launcher"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    srv = limited(
        hang_repo,
        "--model-control-mode",
        "explicit",
        "--worker-python",
        str(python),
        "--exit-timeout-secs",
        "5",
    ).start()
    fresh.append(srv)
    t0 = time.monotonic()
    code, body = request(srv.port, "POST", "/v2/repository/models/add_sub/load", b"{}")
    # Triton's text and code for a failed load (INVALID_ARGUMENT: 400), naming the reason
    assert code == 400 and body["error"].startswith("load failed for model 'add_sub': version 1 is at "), body
    assert "cannot start a worker process" in body["error"] and "No such file" in body["error"], body
    assert time.monotonic() - t0 < 10
    assert request(srv.port, "GET", "/v2/health/ready")[0] == 400
    python.symlink_to(launcher)
    assert request(srv.port, "POST", "/v2/repository/models/add_sub/load", b"{}")[0] == 200
    assert request(srv.port, "GET", "/v2/health/ready")[0] == 200
    # the interpreter goes away, then the worker dies: restarts fail, and say why
    python.unlink()
    os.kill(srv.worker_pids("add_sub")[-1], signal.SIGKILL)
    srv.wait_log(r"restart failed: cannot start a worker process")
    wait_for(lambda: request(srv.port, "GET", "/v2/health/ready")[0] == 400)
    code, index = request(srv.port, "POST", "/v2/repository/index", b"{}")
    entry = next(e for e in index if e["name"] == "add_sub")
    assert entry["state"] == "UNAVAILABLE" and "cannot start a worker process" in entry["reason"], entry
    python.symlink_to(launcher)
    wait_for(lambda: request(srv.port, "GET", "/v2/health/ready")[0] == 200, timeout_s=30)
    assert request(srv.port, "POST", "/v2/models/add_sub/infer", ADD_SUB)[0] == 200


def test_loading_names_not_in_the_repository_leaves_no_trace(hang_repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(hang_repo, "--model-control-mode", "explicit", "--load-model", "add_sub").start()
    fresh.append(srv)
    _, before = request(srv.port, "POST", "/v2/repository/index", b"{}")
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    errors: list[str] = []

    def junk(start: int) -> None:
        for i in range(start, start + 100):
            code, body = request(srv.port, "POST", f"/v2/repository/models/junk{i}/load", b"{}")
            if code != 400 or body["error"] != f"failed to load 'junk{i}', failed to poll from model repository":
                errors.append(f"{code} {body}")

    try:
        threads = [threading.Thread(target=junk, args=(k * 100,)) for k in range(3)]
        for t in threads:
            t.start()
        for i in range(50):
            with pytest.raises(InferenceServerException) as err:
                g.load_model(f"gjunk{i}")
            assert "failed to poll from model repository" in str(err.value)
        for t in threads:
            t.join(60)
    finally:
        g.close()
    assert not errors, errors[:3]
    assert request(srv.port, "POST", "/v2/repository/index", b"{}")[1] == before
    assert request(srv.port, "GET", "/v2/health/ready")[0] == 200
