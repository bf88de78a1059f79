"""The command line an operator meets, through the real server: ``shoal --help`` lists every
subcommand; a port already in use is named with its flag (no traceback, exit status 1);
``shoal workers list --url ...`` in the README's order; ``shoal workers logs MODEL INSTANCE``
shows a worker's recent output (stdout and stderr, kept across a crash and restart) while
every line still reaches the router's own stdout / stderr (and ``--log-file``) unchanged."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ROOT, ServerProcess, make_repository, wait_until


def _shoal(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shoal.server", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, check=False)


def _serve(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["serve", "--model-repository", str(repo), "--host", "127.0.0.1"]
    return _shoal(*base, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args)


@pytest.fixture(scope="module")
def chatty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(make_repository(tmp_path_factory.mktemp("repo"), "chatty")).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _chatty(srv: ServerProcess, value: int) -> None:
    inp = httpclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([value], dtype=np.int32))
    srv.client().infer("chatty", [inp])


def test_help_lists_every_subcommand() -> None:
    out = _shoal("--help")
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^    (\w+)\s", out.stdout, re.M)
    assert listed == ["serve", "workers"], out.stdout
    workers = _shoal("workers", "--help")
    assert workers.returncode == 0
    assert all(action in workers.stdout for action in ("list", "restart", "logs", "--url"))
    serve = _shoal("serve", "--help")
    assert serve.returncode == 0 and "--model-repository" in serve.stdout


@pytest.mark.parametrize("flag,what", [("--http-port", "HTTP"), ("--grpc-port", "gRPC"), ("--metrics-port", "Metrics")])
def test_port_in_use(tmp_path: Path, flag: str, what: str) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve(repo, flag, str(port))
    assert out.returncode == 1, out.stderr
    assert f"{what} port {port} is in use ({flag})" in out.stderr
    assert "Traceback" not in out.stderr
    assert "server stopped" in out.stderr  # and it cleaned up after itself


def test_workers_logs(chatty: ServerProcess) -> None:
    _chatty(chatty, 42)
    url = f"http://{chatty.url}"
    (pid,) = chatty.worker_pids("chatty")

    def logs(*extra: str) -> str:
        out = _shoal("workers", "logs", "chatty", "chatty_0", "--url", url, *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout

    wait_until(lambda: "chatty warns about 42" in logs(), 15)
    text = logs()
    assert f"==> chatty version 1 chatty_0 pid {pid} <==" in text
    for line in (f"chatty loaded in pid {pid}", f"chatty stderr at load in pid {pid}", "chatty got 42"):
        assert line in text.splitlines(), text
    assert logs("--lines", "1").splitlines()[-1] in ("chatty got 42", "chatty warns about 42")
    assert len(logs("--lines", "1").splitlines()) == 2  # the header and one line
    # every stderr line also reached the router's stderr, unchanged
    wait_until(lambda: "chatty warns about 42\n" in chatty.log, 10)
    # the admin API behind it
    out = _shoal("workers", "logs", "chatty", "nosuch", "--url", url)
    assert out.returncode == 1 and "has no instance 'nosuch'" in out.stderr
    # the README's order, and the older one
    for args in (("list", "--url", url), ("--url", url, "list")):
        listed = _shoal("workers", *args)
        assert listed.returncode == 0, listed.stderr
        assert any(line.split()[:3] == ["chatty", "1", "chatty_0"] for line in listed.stdout.splitlines())


def test_workers_logs_after_a_crash(chatty: ServerProcess) -> None:
    (old,) = chatty.worker_pids("chatty")
    with pytest.raises(InferenceServerException):
        _chatty(chatty, -1)
    wait_until(lambda: len(chatty.worker_pids("chatty")) == 2, 30)
    new = chatty.worker_pids("chatty")[-1]
    out = _shoal("workers", "logs", "chatty", "chatty_0", "--version", "1", "--url", f"http://{chatty.url}")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # the crashed process's last line, then the new process's
    assert text.index(f"pid {old} <==") < text.index("chatty is about to exit with status 3")
    assert text.index("chatty is about to exit with status 3") < text.index(f"pid {new} <==")
    assert f"chatty loaded in pid {new}" in text


def test_worker_output_with_log_file(tmp_path: Path) -> None:
    """``--log-file``: the workers' stderr lines go to the file with the router's log (as
    when they inherited the router's stderr), their stdout to the router's stdout."""
    repo = make_repository(tmp_path / "repo", "chatty")
    log_file = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "shoal.server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1"]
    cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(log_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while "shoal: server " not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the server never logged its start"
            time.sleep(0.1)
        found = re.search(r"HTTP listening on \S+:(\d+)", log_file.read_text())
        assert found is not None
        client = httpclient.InferenceServerClient(f"127.0.0.1:{found.group(1)}")
        inp = httpclient.InferInput("INPUT0", [1], "INT32")
        inp.set_data_from_numpy(np.array([7], dtype=np.int32))
        client.infer("chatty", [inp])
        client.close()
        wait_until(lambda: "chatty warns about 7" in log_file.read_text(), 10)
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stderr == b""  # everything went to the file
    text = log_file.read_text()
    assert "chatty warns about 7\n" in text and "chatty got 7" not in text
    assert b"chatty got 7\n" in stdout and b"chatty loaded in pid" in stdout
