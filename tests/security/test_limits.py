"""Bounds on what a client may make the server hold: worker processes, shared-memory
registrations (per client and overall), and the workers' descriptors."""

from __future__ import annotations

import json
import os
import resource
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

from tests.e2e.server import ServerProcess
from tests.security.conftest import limited, request

KEY_PREFIX = f"shoaltest_{os.getpid()}_"


def external_ip() -> str | None:
    """A non-loopback address of this host (clients from it are remote to the server)."""
    for target in ("10.255.255.254", "203.0.113.1", "8.8.8.8"):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((target, 9))  # a UDP connect sends no packet
            ip = str(probe.getsockname()[0])
        except OSError:
            continue
        finally:
            probe.close()
        if not ip.startswith("127."):
            return ip
    return None


class Objects:
    """POSIX shm objects a test creates; all unlinked at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self, size: int, data: bytes = b"") -> str:
        name = f"{KEY_PREFIX}{secrets.token_hex(4)}"
        obj = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
        if data:
            os.pwrite(obj.fd, data, 0)
        obj.close_fd()
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            try:
                posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass


@pytest.fixture
def objects() -> Iterator[Objects]:
    o = Objects()
    yield o
    o.cleanup()


def register(
    host: str, port: int, name: str, key: str, size: int, headers: dict[str, str] | None = None
) -> tuple[int, dict]:  # type: ignore[type-arg]
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        body = json.dumps({"key": key, "offset": 0, "byte_size": size}).encode()
        conn.request("POST", f"/v2/systemsharedmemory/region/{name}/register", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data else {}


def test_instance_count_override_is_bounded(repo: Path, fresh: list[ServerProcess]) -> None:
    srv = limited(repo, "--model-control-mode", "explicit", "--max-worker-processes", "6").start()
    fresh.append(srv)
    config = {
        "name": "add_sub",
        "backend": "python",
        "input": [{"name": f"INPUT{i}", "data_type": "TYPE_FP32", "dims": [4]} for i in range(2)],
        "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_FP32", "dims": [4]} for i in range(2)],
        "instance_group": [{"kind": "KIND_CPU", "count": 100_000}],
    }
    body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
    code, reply = request(srv.port, "POST", "/v2/repository/models/add_sub/load", body)
    # Triton's text and code for a failed load (400), naming Shoal's reason
    assert code == 400 and reply["error"].startswith("load failed for model 'add_sub': version 1 is at"), reply
    assert "needs 100000 worker processes" in reply["error"], reply
    assert "--max-worker-processes" in reply["error"]
    assert not srv.worker_pids("add_sub")
    config["instance_group"] = [{"kind": "KIND_CPU", "count": 6}]
    body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
    assert request(srv.port, "POST", "/v2/repository/models/add_sub/load", body)[0] == 200
    assert request(srv.port, "GET", "/v2/health/ready")[0] == 200


def test_shm_regions_are_bounded_per_client_and_overall(
    repo: Path, fresh: list[ServerProcess], objects: Objects
) -> None:
    ip = external_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address to be a second client from")
    srv = limited(
        repo,
        "--host",
        "0.0.0.0",
        "--http-restricted-api",
        "shared-memory:X-Shm=s3cret",
        "--client-shm-max-regions",
        "12",
        "--client-shm-max-regions-per-client",
        "8",
    ).start()
    fresh.append(srv)
    auth = {"X-Shm": "s3cret"}
    key = objects.create(4096)
    for i in range(8):
        assert register("127.0.0.1", srv.port, f"r{i}", key, 64, auth)[0] == 200
    code, reply = register("127.0.0.1", srv.port, "r8", key, 64, auth)
    assert code == 429 and "by this client (limit 8, --client-shm-max-regions-per-client)" in reply["error"], reply
    # another client (another address): the same names are its own, until the server is full
    for i in range(4):
        assert register(ip, srv.port, f"r{i}", key, 64, auth)[0] == 200
    code, reply = register(ip, srv.port, "r4", key, 64, auth)
    assert code == 429 and "on this server (limit 12, --client-shm-max-regions)" in reply["error"], reply
    code, mine = request(srv.port, "GET", "/v2/systemsharedmemory/status", headers=auth)
    assert code == 200 and sorted(r["name"] for r in mine) == [f"r{i}" for i in range(8)]
    assert request(srv.port, "POST", "/v2/systemsharedmemory/unregister", b"", headers=auth)[0] == 200
    # only this client's regions went: the other one's are still there
    code, reply = register(ip, srv.port, "r0", key, 64, auth)
    assert (code, reply["error"]) == (400, "shared memory region 'r0' already in manager"), reply


def test_worker_descriptors_are_bounded(repo: Path, fresh: list[ServerProcess], objects: Objects) -> None:
    """300 regions used one after the other by one worker that may open 256 descriptors:
    every request is served (the worker closes the least recently used ones)."""
    srv = limited(
        repo,
        "--client-shm-max-regions-per-client",
        "400",
        rlimits={resource.RLIMIT_NOFILE: (256, 256)},
    ).start()
    fresh.append(srv)
    data = np.arange(4, dtype=np.float32)
    failures = []
    for i in range(300):
        key = objects.create(64, data.tobytes())
        assert register("127.0.0.1", srv.port, f"r{i}", key, 64)[0] == 200
        body = {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [4],
                    "parameters": {"shared_memory_region": f"r{i}", "shared_memory_byte_size": 16},
                }
            ],
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "parameters": {
                        "shared_memory_region": f"r{i}",
                        "shared_memory_offset": 16,
                        "shared_memory_byte_size": 16,
                    },
                }
            ],
        }
        code, reply = request(srv.port, "POST", "/v2/models/identity_fp32/infer", json.dumps(body).encode())
        if code != 200:
            failures.append((i, code, reply))
    assert not failures, failures[:3]
    worker = srv.worker_pids("identity_fp32")[0]
    assert len(os.listdir(f"/proc/{worker}/fd")) < 256
    out = np.frombuffer(Path("/dev/shm", objects.names[-1]).read_bytes()[16:32], dtype=np.float32)
    assert (out == data).all()
    assert "Too many open files" not in srv.log
