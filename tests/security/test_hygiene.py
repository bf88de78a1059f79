"""Error hygiene (4xx for clients' mistakes, never a 500, no paths in messages, no log
flood) and start-up reclaim that never touches a live server's memory."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.server import ServerProcess
from tests.security.conftest import limited, request

_HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_long_and_odd_model_names(repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(repo, "--model-control-mode", "explicit").start()
    fresh.append(srv)
    for name in ("x" * 300, "%C3%A9" * 200, "a%0Ab", "a%09b"):
        for action in ("load", "unload"):
            code, reply = request(srv.port, "POST", f"/v2/repository/models/{name}/{action}", b"{}")
            assert code == 400, (name, reply)
            assert str(repo) not in reply["error"] and "/" not in reply["error"].replace("'/'", "")
            assert "\n" not in reply["error"]
    code, reply = request(srv.port, "POST", "/v2/models/" + "x" * 300 + "/infer", b"{}")
    assert code == 400 and str(repo) not in reply["error"]


def test_undecodable_grpc_messages(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        for method in ("ModelInfer", "ServerReady", "RepositoryIndex", "SystemSharedMemoryRegister"):
            call = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff\xff garbage")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "failed to parse the request message" in (err.value.details() or "")
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        answers = list(stream(iter([b"\xff\xff\xff garbage", b"\x0a\x07add_sub"])))
        assert len(answers) == 2  # each message answered on the stream; the stream lived on


def _flood(srv: ServerProcess) -> None:
    header = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    for _ in range(100):
        request(srv.port, "POST", "/v2/models/add_sub/infer", b"{not json")
        request(srv.port, "POST", "/v2/models/nope/infer", b"{}")
        # a BYTES element that runs past its data: refused in the worker, not the router
        request(
            srv.port,
            "POST",
            "/v2/models/strings/infer",
            header + b"\xff\x00\x00\x00abcd",
            {"Inference-Header-Content-Length": str(len(header))},
        )
    with grpc.insecure_channel(srv.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for _ in range(100):
            try:
                call(b"\xff\xff garbage")
            except grpc.RpcError:
                pass


def test_client_errors_do_not_flood_the_log(repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(repo).start()
    fresh.append(srv)
    before = len(srv.lines)
    _flood(srv)
    time.sleep(0.5)
    added = srv.lines[before:]
    assert not [line for line in added if " ERROR " in line or " WARNING " in line], added[:5]
    assert len(added) < 5, added[:10]


def test_client_errors_at_verbose_level_are_rate_limited(repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(repo, "--log-verbose", "1").start()
    fresh.append(srv)
    before = len(srv.lines)
    t0 = time.monotonic()
    _flood(srv)
    took = time.monotonic() - t0
    time.sleep(0.5)
    client_lines = [line for line in srv.lines[before:] if "DEBUG shoal.http" in line or "DEBUG shoal.grpc" in line]
    assert client_lines, "client errors are logged at verbose level"
    assert len(client_lines) <= 10 * (took + 2), (len(client_lines), took)
    assert not [line for line in srv.lines[before:] if " ERROR " in line]


def test_reclaim_spares_live_runs(repo: Path, fresh: list[ServerProcess]) -> None:
    """Left-overs of runs whose owner lock is free (killed, zombie) are removed at start, with
    their run directories; a run whose lock is held by a live process keeps everything, even
    though its pid means nothing here (another PID namespace)."""
    tag = secrets.token_hex(3)
    tmp = Path(tempfile.gettempdir())
    live, dead, zombie = (f"shoal_{999_900 + i}_{tag}" for i in range(3))
    made = []
    for run in (live, dead, zombie):
        seg = Path("/dev/shm", f"{run}_in_0")
        seg.write_bytes(b"x" * 64)
        made.append(seg)
        made.append(Path("/dev/shm", f"{run}.lock"))
    Path("/dev/shm", f"{dead}.lock").write_bytes(b"")
    dead_dir = tmp / dead
    dead_dir.mkdir()
    (dead_dir / "lock").write_bytes(b"")
    old_dir = Path(tempfile.mkdtemp(prefix="shoal-", dir=tmp))
    if len(old_dir.name) != len("shoal-") + 8:  # mkdtemp names are 8 characters
        old_dir.rename(tmp / f"shoal-{tag}ab")
        old_dir = tmp / f"shoal-{tag}ab"
    dead_sock = socket.socket(socket.AF_UNIX)
    dead_sock.bind(str(old_dir / "workers.sock"))
    dead_sock.close()  # a socket file nothing listens on
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLD, f"/dev/shm/{run}.lock"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for run in (live, zombie)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "locked\n"
        holder, zombie_proc = procs
        assert zombie_proc.stdin is not None
        zombie_proc.stdin.close()
        while "State:\tZ" not in Path(f"/proc/{zombie_proc.pid}/status").read_text():
            time.sleep(0.01)
        srv = limited(repo).start()
        fresh.append(srv)
        assert Path("/dev/shm", f"{live}_in_0").exists() and Path("/dev/shm", f"{live}.lock").exists()
        for run in (dead, zombie):
            assert not Path("/dev/shm", f"{run}_in_0").exists()
            assert not Path("/dev/shm", f"{run}.lock").exists()
        assert not dead_dir.exists() and not old_dir.exists()
        assert "left by a server that is gone" in srv.log
        assert srv.terminate() == 0
    finally:
        for p in procs:
            if p.stdin is not None and not p.stdin.closed:
                p.stdin.close()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        for path in made:
            path.unlink(missing_ok=True)
        for d in (dead_dir, old_dir):
            if d.exists():
                subprocess.run(["rm", "-rf", str(d)], check=False)
    assert not any(n.startswith(f"shoal_{os.getpid()}") for n in os.listdir("/dev/shm"))
