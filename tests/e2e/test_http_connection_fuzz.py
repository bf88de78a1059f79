"""One keep-alive connection, many kinds of request, cut anywhere: the HTTP fast path and
aiohttp share each connection (``server/frontends/http/fastpath.py`` hands requests over
in both directions), so the sequences that matter are mixes. Hypothesis draws a sequence
of requests (answered by the fast path or by aiohttp: gzip either way, chunked bodies,
slow models, GETs, bodies from 4 bytes to 1.2 MB), sends it pipelined or one by one, cut
at random places with pauses between the pieces, and every answer must come, in order,
right. A hang shows as a 408 after 5 s (``--http-body-timeout-secs``) or a client timeout.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.e2e.server import ServerProcess, make_repository
from tests.e2e.test_http_fastpath import MODEL, Reader, infer_request, output_of


@pytest.fixture(scope="module", params=["router", "frontend"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The router serving HTTP itself, and one frontend process serving it (whose requests
    the router may take back: the fast path's decline)."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), MODEL, "slow")
    extra = ("--frontend-processes", "1") if request.param == "frontend" else ()
    srv = ServerProcess(repo, "--http-body-timeout-secs", "5", *extra).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()
    for bad in ("Traceback", "pause_writing() failed", "Error handling request", "timed out reading"):
        assert bad not in srv.log, srv.log


SIZES = (1, 37, 50_000, 160_000, 300_000)
"""FP32 elements: up to 1.2 MB, past aiohttp's 512 KiB body buffer and the fast path's 1 MiB
reading hold."""

Check = Callable[[int, dict[str, str], bytes], None]


@dataclass
class Req:
    kind: str
    size: int
    wire: bytes
    check: Check


def _split(req: bytes) -> tuple[list[str], bytes]:
    head, body = req.split(b"\r\n\r\n", 1)
    return head.decode("latin-1").split("\r\n"), body


def _join(lines: list[str], body: bytes) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _expect_values(values: np.ndarray, by_aiohttp: bool | None) -> Check:
    def check(status: int, headers: dict[str, str], body: bytes) -> None:
        assert status == 200, body[:300]
        if by_aiohttp is not None:
            assert ("server" in headers) == by_aiohttp, headers
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        np.testing.assert_array_equal(output_of(headers, body), values)

    return check


def _expect_config(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 200 and json.loads(body)["name"] == MODEL, body[:300]


def make_request(kind: str, size: int, k: int, fast: bool | None) -> Req:
    """``fast``: whether the fast path must answer a plain request (``None``: either side
    may; aiohttp answers those pipelined behind its own, and all after a chunked one)."""
    values = np.arange(size, dtype=np.float32) + k
    plain = None if fast is None else not fast  # by aiohttp?
    if kind == "fast":
        return Req(kind, size, infer_request(values.tolist()), _expect_values(values, plain))
    if kind == "json":
        values = values[:40]
        req = infer_request(values.tolist(), binary=False)
        return Req(kind, len(values), req, _expect_values(values, plain))
    if kind == "slow":  # a model that takes its time
        values = values[:40]
        req = infer_request(values.tolist(), model="slow", params={"delay_ms": 120})
        return Req(kind, len(values), req, _expect_values(values, plain))
    if kind == "accept_gzip":
        req = infer_request(values.tolist(), extra="Accept-Encoding: gzip")
        return Req(kind, size, req, _expect_values(values, True))
    if kind == "gzip_body":
        lines, body = _split(infer_request(values.tolist()))
        packed = gzip.compress(body, compresslevel=1)
        lines = [ln for ln in lines if not ln.startswith("Content-Length")]
        lines += [f"Content-Length: {len(packed)}", "Content-Encoding: gzip"]
        return Req(kind, size, _join(lines, packed), _expect_values(values, True))
    if kind == "chunked":
        lines, body = _split(infer_request(values.tolist()))
        lines = [ln for ln in lines if not ln.startswith("Content-Length")] + ["Transfer-Encoding: chunked"]
        step = max(1, len(body) // 3 + 1)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces)
        return Req(kind, size, _join(lines, chunks + b"0\r\n\r\n"), _expect_values(values, True))
    assert kind == "config"
    return Req(kind, 0, b"GET /v2/models/%s/config HTTP/1.1\r\nHost: shoal\r\n\r\n" % MODEL.encode(), _expect_config)


KINDS = ("fast", "json", "slow", "accept_gzip", "gzip_body", "chunked", "config")

requests_st = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(SIZES)), min_size=1, max_size=5)


def _send(sock: socket.socket, data: bytes, cuts: list[float], pause_s: float, errors: list[BaseException]) -> None:
    try:
        points = sorted({int(c * len(data)) for c in cuts} - {0, len(data)})
        start = 0
        for p in [*points, len(data)]:
            sock.sendall(data[start:p])
            start = p
            if pause_s:
                time.sleep(pause_s)
    except OSError as exc:  # the reader's failure says more
        errors.append(exc)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    drawn=requests_st,
    pipelined=st.booleans(),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    pause_s=st.sampled_from((0.0, 0.0, 0.02)),
)
# a large request aiohttp answers arriving whole behind a slow one (once a 408: the fast path
# swallowed aiohttp's self-feed that completes the message after its flow control paused it)
@example(drawn=[("slow", 1), ("accept_gzip", 160_000)], pipelined=True, cuts=[], pause_s=0.0)
# pipelined past the reading hold, switching sides
@example(drawn=[("fast", 300_000), ("chunked", 300_000), ("fast", 300_000)], pipelined=True, cuts=[0.5], pause_s=0.0)
def test_mixed_requests_on_one_connection(
    server: ServerProcess, drawn: list[tuple[str, int]], pipelined: bool, cuts: list[float], pause_s: float
) -> None:
    reqs = []
    for k, (kind, size) in enumerate(drawn):
        for_good = any(d[0] == "chunked" for d in drawn[:k])  # aiohttp keeps the connection
        reqs.append(make_request(kind, size, k, None if pipelined or for_good else True))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    reader = Reader(sock)
    errors: list[BaseException] = []
    try:
        if pipelined:
            sender = threading.Thread(
                target=_send, args=(sock, b"".join(r.wire for r in reqs), cuts, pause_s, errors), daemon=True
            )
            sender.start()
            for r in reqs:
                r.check(*reader.response())
            sender.join(20)
        else:
            for r in reqs:
                _send(sock, r.wire, cuts, pause_s, errors)
                r.check(*reader.response())
    finally:
        sock.close()
    assert not errors, errors
