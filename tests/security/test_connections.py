"""Connections: half-open and slow ones must not exhaust descriptors or lock clients out."""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess
from tests.security.conftest import GoodClient, limited, request, wait_for

FD_LIMIT = 512


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_many(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return out


def test_half_open_http_connections(repo: Path, fresh: list[ServerProcess]) -> None:
    """600 connections that never send a request, against a router limited to 512
    descriptors and 32 connections: the router keeps its descriptors, good clients and
    health checks are served throughout, and idle connections are closed."""
    srv = limited(
        repo,
        "--http-max-connections",
        "32",
        "--http-keepalive-timeout-secs",
        "3",
        rlimits={resource.RLIMIT_NOFILE: (FD_LIMIT, FD_LIMIT)},
    ).start()
    fresh.append(srv)
    pid = srv.pid
    idle = connect_many(srv.port, 600)
    time.sleep(1.2)  # held past the eviction grace: they are what an attacker keeps open
    with GoodClient(srv.port) as good:
        try:
            assert open_fds(pid) < FD_LIMIT - 64
            assert request(srv.port, "GET", "/v2/health/ready")[0] == 200
            # a slow client that sends its headers a byte at a time is just another idle one
            slow = socket.create_connection(("127.0.0.1", srv.port))
            slow.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHo")
            time.sleep(4)
            assert request(srv.port, "GET", "/v2/health/live")[0] == 200
        finally:
            for s in idle:
                s.close()
    good.check()
    assert "Too many open files" not in srv.log
    # the keep-alive timer closed the slow one
    slow.settimeout(5)
    assert slow.recv(100) == b""
    slow.close()


def test_reserve_answers_health_checks_when_every_connection_is_busy(repo: Path, fresh: list[ServerProcess]) -> None:
    """Every regular connection is in the middle of a request (bodies still arriving): new
    connections get the reserve, which answers health checks and nothing else."""
    srv = limited(repo, "--http-max-connections", "4", "--http-body-timeout-secs", "20").start()
    fresh.append(srv)
    busy = []
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            busy.append(s)
        time.sleep(0.5)
        assert request(srv.port, "GET", "/v2/health/ready")[0] == 200
        code, body = request(srv.port, "GET", "/v2/models/add_sub/config")
        assert code == 503 and "too many open HTTP connections" in body["error"]
    finally:
        for s in busy:
            s.close()
    wait_for(lambda: request(srv.port, "GET", "/v2/models/add_sub/config")[0] == 200)


def test_half_open_grpc_connections(repo: Path, fresh: list[ServerProcess]) -> None:
    """Raw TCP connections to the gRPC port beyond --grpc-max-connections are closed at
    once (grpc's own limit): the router's descriptors stay bounded, HTTP is unaffected, and
    gRPC serves again once they are gone (grpc closes those that never finish the HTTP/2
    handshake after 10 s)."""
    srv = limited(
        repo,
        "--grpc-max-connections",
        "16",
        rlimits={resource.RLIMIT_NOFILE: (FD_LIMIT, FD_LIMIT)},
    ).start()
    fresh.append(srv)
    pid = srv.pid
    with GoodClient(srv.port) as good:
        raw = connect_many(srv.grpc_port, 300)
        time.sleep(1)
        assert open_fds(pid) < FD_LIMIT - 64
        for s in raw:
            s.close()
    good.check()

    def grpc_ok() -> bool:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            return bool(c.is_server_ready(client_timeout=2))
        except Exception:  # noqa: BLE001 - not yet
            return False
        finally:
            c.close()

    wait_for(grpc_ok, timeout_s=20)
