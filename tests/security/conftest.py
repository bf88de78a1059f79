"""The server as an attacker meets it: each test sends one attack while a good client keeps
using the server, then checks the answer, the good client's service, and memory.

Servers here run under an address-space limit (``RLIMIT_AS``, also on their workers), so an
attack that would exhaust memory fails in the server instead of the machine."""

from __future__ import annotations

import http.client
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import ServerProcess, make_repository

pytest.register_assert_rewrite("tests.security.fuzzing")

MEMORY_LIMIT = 6 << 30
"""Address space of every server process here (virtual: the router maps ~1 GB at rest)."""
MODELS = ("add_sub", "identity_fp32", "strings", "slow", "crashy", "batcher")
ADD_SUB = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 1, 1, 1]},
        ]
    }
).encode()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/security/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def limited(repo: Path, *extra: str, **kw: Any) -> ServerProcess:
    """A server under ``MEMORY_LIMIT`` (not started)."""
    rlimits = {resource.RLIMIT_AS: (MEMORY_LIMIT, MEMORY_LIMIT), **kw.pop("rlimits", {})}
    return ServerProcess(repo, *extra, rlimits=rlimits, **kw)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), *MODELS)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    """One limited server per module, with small limits so attacks stay cheap (64 MiB
    bodies, a 3 s body timeout, workers' outputs up to 16 MiB, 32 unread responses per
    gRPC stream). Its garbage collector never runs (``SHOAL_GC_CHECK``): at the end no frame
    of router code may be left in a reference cycle by anything the module sent."""
    srv = limited(
        repo,
        "--http-max-body-size",
        str(64 << 20),
        "--http-body-timeout-secs",
        "3",
        "--worker-arena-bytes",
        str(1 << 20),
        "--grpc-stream-max-pending",
        "32",
        env={"SHOAL_GC_CHECK": "1"},
    ).start()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments()
    assert "gc check: 0 router frames in reference cycles" in srv.log, srv.log[-3000:]
    assert "Traceback" not in srv.log, srv.log[-5000:]  # no attack makes the server log one


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.kill()


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem and VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh at the current RSS (it is otherwise the peak since the process began)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def wait_for(predicate: Any, timeout_s: float = 30.0, step_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError("condition not reached in time")


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, Any]:
    """One HTTP request on a fresh connection; the status and the JSON body ({} if none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, (json.loads(data) if data else {})


class GoodClient:
    """Keeps sending add_sub over HTTP while an attack runs; records failures and the slowest
    answer. The loop runs in a process of its own (``tests/security/goodclient.py``): a
    thread here would share the test's GIL, and the test's own work (a large JSON answer
    parsed) would be counted as the server's latency."""

    def __init__(self, port: int, *, interval_s: float = 0.05) -> None:
        self.port = port
        self.interval_s = interval_s
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self._out = Path(tempfile.mkstemp(prefix="goodclient-", suffix=".jsonl")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GoodClient:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.security.goodclient", str(self.port), str(self.interval_s), str(self._out)],
            stdin=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        finally:
            self._proc.kill()
            self._proc.wait()
        for line in self._out.read_text().splitlines():
            seconds, failure = json.loads(line)
            self.latencies.append(seconds)
            if failure:
                self.failures.append(failure)
        self._out.unlink()

    def check(self, max_latency_s: float = 2.0) -> None:
        """Served throughout, every answer within ``max_latency_s``."""
        assert self.latencies, "the good client never ran"
        assert not self.failures, self.failures[:5]
        assert max(self.latencies) < max_latency_s, f"slowest good request {max(self.latencies):.2f} s"
