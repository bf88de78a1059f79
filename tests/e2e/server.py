"""Start the real server process on port 0 and read the bound port back."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[2]
TEST_MODELS = ROOT / "tests" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"
_PORT_RE = re.compile(r"HTTP listening on \S+:(\d+)")
_GRPC_PORT_RE = re.compile(r"GRPC listening on \S+:(\d+)")
_METRICS_PORT_RE = re.compile(r"Metrics listening on \S+:(\d+)")
_HEALTH_PORT_RE = re.compile(r"HTTP health listening on \S+:(\d+)")


class ServerProcess:
    """``python -m shoal.server serve`` as a child process; its log is kept in ``self.log``."""

    def __init__(
        self,
        repository: Path | str,
        *extra: str,
        env: dict[str, str] | None = None,
        rlimits: dict[int, tuple[int, int]] | None = None,
        triton: bool = False,
    ) -> None:
        """``env``: extra environment; ``rlimits``: resource limits of the server process
        (and so of its workers), e.g. ``{resource.RLIMIT_AS: (4 << 30, 4 << 30)}``;
        ``triton``: start it as ``tritonserver`` (Triton's command line and defaults)."""
        self.triton = triton
        self.health_port = 0
        self.repository = repository
        self.extra = extra
        self.env = env or {}
        self.rlimits = rlimits or {}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self.lines: list[str] = []
        self._port_seen = threading.Event()
        self._ready_seen = threading.Event()
        self._clients: list[httpclient.InferenceServerClient] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self, *, wait_ready: bool = True, timeout_s: float = 60.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            *(("shoal.server.tritonserver",) if self.triton else ("shoal.server", "serve")),
            "--model-repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            # the whole suite under an option of Shoal's own, e.g. "--busy-poll-us 200" (a
            # test's own options come after, so they win)
            *shlex.split(os.environ.get("SHOAL_TEST_SERVER_ARGS", "")),
            *self.extra,
        ]
        env = {**os.environ, **self.env}
        limits = dict(self.rlimits)

        def apply_limits() -> None:
            import resource

            for which, value in limits.items():
                resource.setrlimit(which, value)

        self.proc = subprocess.Popen(
            cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
            preexec_fn=apply_limits if limits else None,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._port_seen.wait(0.05):
            if self.proc.poll() is not None:  # no point waiting for a process that is gone
                self._pump_thread.join(5)
                status = self.proc.returncode
                raise RuntimeError(f"server exited with status {status} before reporting its port:\n{self.log}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not report its port:\n{self.log}")
        if wait_ready and not self._ready_seen.wait(timeout_s):
            self.kill()
            raise RuntimeError(f"server did not finish loading:\n{self.log}")
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            g = _GRPC_PORT_RE.search(line)
            if g:
                self.grpc_port = int(g.group(1))
            mp = _METRICS_PORT_RE.search(line)
            if mp:
                self.metrics_port = int(mp.group(1))
            h = _HEALTH_PORT_RE.search(line)
            if h:
                self.health_port = int(h.group(1))
            m = _PORT_RE.search(line)
            if m and not h:
                self.port = int(m.group(1))
            if m or g:
                self._port_seen.set()
            if "shoal: server ready" in line or "shoal: server started" in line:
                # the last line of start-up: every listener is up ("shoal: server stopped"
                # is not: a server that fails at start-up logs it too)
                self._port_seen.set()
                self._ready_seen.set()

    def client(self, **kwargs: object) -> httpclient.InferenceServerClient:
        """A tritonclient HTTP client, closed when the server is stopped."""
        c = httpclient.InferenceServerClient(self.url, **kwargs)
        self._clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()

    def children(self, cmd: str = "") -> list[int]:
        """The server's live child processes (workers, frontend processes; not zombies), those
        with ``cmd`` in their command line when given."""
        assert self.proc is not None
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[1]) == self.proc.pid and cmd in cmdline:
                out.append(int(entry))
        return out

    def worker_pids(self, model: str) -> list[int]:
        pids = re.findall(rf"model '{re.escape(model)}' version \d+ instance '[^']+': ready \(pid (\d+)\)", self.log)
        return [int(p) for p in pids]

    def wait_log(self, pattern: str, timeout_s: float = 30.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search("".join(self.lines[start:]))
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.close_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_pipe()
        return rc

    def _close_pipe(self) -> None:
        assert self.proc is not None
        self._pump_thread.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        scan = os.environ.get("SHOAL_TEST_LOG_SCAN")
        if scan:
            _scan_log(self.log, Path(scan))

    def kill(self) -> None:
        """SIGKILL, then remove what the server could not (its shared memory, its owner lock
        and run directory), as the next server's start-up would."""
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._close_pipe()
            for name in self.segments():
                Path("/dev/shm", name).unlink(missing_ok=True)
            for run in Path(tempfile.gettempdir()).glob(f"shoal_{self.proc.pid}_*"):
                shutil.rmtree(run, ignore_errors=True)

    def run_dir(self) -> Path:
        """The server's run directory (sockets, uploaded model files)."""
        assert self.proc is not None
        (found,) = Path(tempfile.gettempdir()).glob(f"shoal_{self.proc.pid}_*")
        return found

    def segments(self) -> list[str]:
        assert self.proc is not None
        prefix = f"shoal_{self.proc.pid}_"
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def make_repository(dest: Path, *models: str) -> Path:
    """Copy the named test and example models into ``dest`` (ONNX examples generated)."""
    dest.mkdir(parents=True, exist_ok=True)
    onnx_models = {"simple_onnx", "identity_onnx", "mlp_onnx"}
    wanted_onnx = [m for m in models if m in onnx_models]
    for m in models:
        if m in onnx_models:
            continue
        src = TEST_MODELS / m if (TEST_MODELS / m).is_dir() else EXAMPLE_MODELS / m
        shutil.copytree(src, dest / m, ignore=shutil.ignore_patterns("__pycache__"))
    if wanted_onnx:
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_examples", ROOT / "scripts" / "make_examples.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["make_examples"] = mod
        spec.loader.exec_module(mod)
        tmp = dest / ".onnx_gen"
        mod.make_examples(tmp)
        for m in wanted_onnx:
            shutil.copytree(tmp / m, dest / m)
        shutil.rmtree(tmp)
    return dest


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` every 0.1 s until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def served(tmp_path_factory: Any, models: tuple[str, ...], *args: str) -> Iterator[ServerProcess]:
    """A module fixture's body: a server over ``models`` (with ``args``), checked when the
    module is done: exit status 0 after SIGTERM and no shared memory left."""
    srv = ServerProcess(make_repository(tmp_path_factory.mktemp("repo"), *models), *args).start()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), srv.segments()


# gRPC core's BDP probe grows an HTTP/2 stream's receive window up to 2**25 bytes (its PID
# controller's ceiling on log2 of the window), whether or not the application reads.
GRPC_STREAM_WINDOW_MAX = 1 << 25


def unread_stream_bound(payload_bytes: int, max_pending: int) -> int:
    """How many requests of ``payload_bytes`` a gRPC client that never reads its stream's
    responses can hand to gRPC against a server that stops reading the stream at
    ``max_pending``: what the server's stream window holds, what the client's window
    holds of their responses, both directions' TCP buffers at their autotuning maximum,
    and the pending ones. On loopback with Linux defaults that is about 136 MiB, so a
    count near it is gRPC's buffering and not a server that kept reading."""

    def sysctl_max(name: str) -> int:
        return int(Path("/proc/sys/net/ipv4", name).read_text().split()[2])

    socket_buffers = 2 * (sysctl_max("tcp_wmem") + sysctl_max("tcp_rmem"))
    return (2 * GRPC_STREAM_WINDOW_MAX + socket_buffers) // payload_bytes + max_pending + 2


def unread_stream_cap(payload_bytes: int, max_pending: int) -> int:
    """How many requests a test's never-reading client offers in all: four times
    ``unread_stream_bound``. That estimate is not a bound: CI once saw 2524 requests of 64
    KiB (158 MiB) taken where it says 2182, the count steady, so gRPC buffers more than it
    counts. A server that stops reading leaves the client short of this cap, its count
    steady; one that kept reading would take all of it."""
    return 4 * unread_stream_bound(payload_bytes, max_pending)


needs_private_dev_shm = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a private /dev/shm",
)


def in_private_mounts(script: str, *args: str, timeout_s: float = 150) -> dict[str, Any]:
    """Run the Python ``script`` (``sys.argv[1]``: the repository root, then ``args``) in a
    mount namespace of its own (``unshare -m``), where it may mount a /dev/shm of any size;
    the JSON object its last line prints. Skips the test where mounting is not allowed."""
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", script, str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip("mounting a tmpfs is not allowed here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def at_once(n: int, one: Callable[[int], None]) -> None:
    """``one(k)`` for k in range(n), on n threads released together; fails with their errors."""
    gate = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            gate.wait()
            one(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


LOG_SUSPECTS = re.compile(
    r"ERROR asyncio|Traceback|Exception in callback|Task exception was never retrieved|"
    r"Task was destroyed|AssertionError|never awaited"
)


def _scan_log(log: str, out: Path) -> None:
    """``SHOAL_TEST_LOG_SCAN=FILE``: the lines of a server's log that often mean a hidden
    error (asyncio's exception handler, tracebacks, tasks nobody awaited), appended to FILE
    with the test that ran the server: a sweep for errors no test asserts on (such as
    asyncio's "protocol.pause_writing() failed", logged and otherwise unnoticed)."""
    lines = log.splitlines()
    hits: list[str] = []
    for i, line in enumerate(lines):
        if LOG_SUSPECTS.search(line):
            if line.startswith("Traceback"):  # the line that logged it, and what was raised
                raised = [t for t in lines[i + 1 : i + 80] if t[:1] not in (" ", "\t")][:1]
                hits.extend([*lines[max(i - 1, 0) : i], line, *(f"  {t}" for t in raised)])
            else:
                hits.append(line)
    if hits:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?")
        with out.open("a") as f:
            f.write(f"== {test}\n" + "\n".join(hits[:40]) + "\n")
