"""Operators and single workers through the real server: the admin API lists every worker
process; ``shoal workers restart`` replaces one instance while traffic runs (its requests in
flight finish, the other instance keeps serving, nothing fails); bad names and a server
without ``--allow-admin-api`` give clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.server import ROOT, ServerProcess, make_repository, wait_until


@pytest.fixture(scope="module")
def aserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "slow", "add_sub")
    srv = ServerProcess(repo, "--allow-admin-api=true").start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shoal.server", "workers", "--url", f"http://{srv.url}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def _workers(srv: ServerProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://{srv.url}/v2/admin/workers", timeout=10) as resp:
        rows: list[dict[str, Any]] = json.loads(resp.read())["workers"]
    return rows


def test_list_workers(aserver: ServerProcess) -> None:
    rows = _workers(aserver)
    slow = {r["instance"]: r for r in rows if r["model"] == "slow"}
    assert set(slow) == {"slow_0", "slow_1"}
    assert {r["pid"] for r in slow.values()} == set(aserver.worker_pids("slow"))
    assert all(r["state"] == "READY" and r["device"] == "CPU" and r["version"] == "1" for r in rows)
    out = _cli(aserver, "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["model", "version", "instance", "state", "pid", "restarts",
                                                  "outstanding", "device"]  # fmt: skip
    assert any(line.split()[:3] == ["add_sub", "1", "add_sub_0"] for line in out.stdout.splitlines())


def test_restart_one_instance_under_load(aserver: ServerProcess) -> None:
    before = {r["instance"]: r for r in _workers(aserver) if r["model"] == "slow"}
    stop = threading.Event()
    results: list[Any] = []

    def traffic() -> None:
        client = grpcclient.InferenceServerClient(aserver.grpc_url)
        x = np.arange(4, dtype=np.float32)
        i = grpcclient.InferInput("INPUT0", [4], "FP32")
        i.set_data_from_numpy(x)
        try:
            while not stop.is_set():
                try:
                    out = client.infer("slow", [i], parameters={"delay_ms": 100}).as_numpy("OUTPUT0")
                    results.append(bool(np.array_equal(out, x)))
                except Exception as exc:  # noqa: BLE001 - reported below
                    results.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    out = _cli(aserver, "restart", "slow", "slow_0")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert out.returncode == 0, out.stderr
    assert not [r for r in results if r is not True], [r for r in results if r is not True][:3]
    assert len(results) > 6
    after = {r["instance"]: r for r in _workers(aserver) if r["model"] == "slow"}
    assert after["slow_0"]["pid"] != before["slow_0"]["pid"] and after["slow_0"]["state"] == "READY"
    assert after["slow_0"]["restarts"] == before["slow_0"]["restarts"] + 1
    assert after["slow_1"]["pid"] == before["slow_1"]["pid"]  # the other instance was left alone
    assert str(after["slow_0"]["pid"]) in out.stdout
    assert "restarting on request" in aserver.log


def test_bad_restarts(aserver: ServerProcess, tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    out = _cli(aserver, "restart", "slow", "slow_9")
    assert out.returncode != 0 and "model 'slow' has no instance 'slow_9'" in out.stderr, out
    out = _cli(aserver, "restart", "nope", "nope_0")
    assert out.returncode != 0 and "404" in out.stderr and "model 'nope' is not loaded" in out.stderr, out
    out = _cli(aserver, "restart", "slow", "slow_0", "--version", "7")
    assert out.returncode != 0 and "version 7 of model 'slow' has no instance 'slow_0'" in out.stderr, out
    off = ServerProcess(make_repository(tmp_path / "repo", "add_sub")).start()
    fresh_server.append(off)
    out = _cli(off, "restart", "add_sub", "add_sub_0")
    assert out.returncode != 0 and "--allow-admin-api=true" in out.stderr, out
    assert _cli(off, "list").returncode == 0  # listing is always allowed
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(f"http://{off.url}/v2/admin/models/add_sub/instances/add_sub_0/restart", data=b""),
            timeout=10,
        )
    assert err.value.code == 503
    err.value.close()
    assert off.terminate() == 0


def test_sigterm_to_workers_lets_their_batch_finish(aserver: ServerProcess) -> None:
    """`kill` (SIGTERM) to the workers, as a service manager signalling the whole group
    would: the busy one answers its request first, the idle one exits at once; both are
    replaced."""
    before = {r["instance"]: r["pid"] for r in _workers(aserver) if r["model"] == "slow"}
    client = grpcclient.InferenceServerClient(aserver.grpc_url)
    x = np.arange(4, dtype=np.float32)
    i = grpcclient.InferInput("INPUT0", [4], "FP32")
    i.set_data_from_numpy(x)
    result: list[Any] = []

    def call() -> None:
        try:
            result.append(client.infer("slow", [i], parameters={"delay_ms": 800}).as_numpy("OUTPUT0"))
        except Exception as exc:  # noqa: BLE001 - reported below
            result.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    for pid in before.values():
        os.kill(pid, signal.SIGTERM)
    t.join(30)
    client.close()
    assert len(result) == 1 and isinstance(result[0], np.ndarray), result
    np.testing.assert_array_equal(result[0], x)

    def replaced() -> bool:
        now = {r["instance"]: r for r in _workers(aserver) if r["model"] == "slow"}
        return all(now[k]["pid"] != before[k] and now[k]["state"] == "READY" for k in before)

    wait_until(replaced)
    assert "exiting after answering the batch in flight" in aserver.log
