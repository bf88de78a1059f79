"""Memory exhaustion: declared sizes without data, failed large requests, unread gRPC
streams, oversized, compressed and stalled HTTP bodies."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.server import ServerProcess, unread_stream_cap
from tests.security.conftest import GoodClient, limited, request, reset_peak, status, wait_for

MiB = 1 << 20


def raw_http(
    port: int, head: bytes, body_parts: tuple[bytes, ...] = (), timeout_s: float = 20.0
) -> tuple[bytes, float]:
    """Send ``head`` and body parts on a raw socket; the first bytes of the answer and the
    seconds it took to come (a peer that closes while we send still lets us read it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    t0 = time.monotonic()
    try:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:
                break
        try:
            data = s.recv(4096)
        except OSError as exc:
            data = repr(exc).encode()
    finally:
        s.close()
    return data, time.monotonic() - t0


def post_head(length: int | None, *, encoding: str = "", extra: str = "") -> bytes:
    lines = ["POST /v2/models/add_sub/infer HTTP/1.1", "Host: shoal"]
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    if encoding:
        lines.append(f"Content-Encoding: {encoding}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture
def grpc_client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


# ---- 1: a declared element count is checked against the bytes present ------------------------


def test_bytes_shape_without_data(server: ServerProcess, grpc_client: grpcclient.InferenceServerClient) -> None:
    worker = server.worker_pids("strings")[0]
    before = status(worker)["RssAnon"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1, 200_000_000],
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    ).encode()
    with GoodClient(server.port) as good:
        for _ in range(5):
            t0 = time.monotonic()
            code, body = request(
                server.port,
                "POST",
                "/v2/models/strings/infer",
                header,
                {"Inference-Header-Content-Length": str(len(header))},
            )
            assert code == 400 and "200000000 string elements" in body["error"], body
            assert time.monotonic() - t0 < 1.0
            # gRPC: the same shape with empty raw contents
            inp = grpcclient.InferInput("INPUT0", [1, 200_000_000], "BYTES")
            inp._raw_content = b""
            with pytest.raises(InferenceServerException) as err:
                grpc_client.infer("strings", [inp])
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "string elements" in str(err.value)
    good.check()
    assert status(worker)["RssAnon"] < before + 20 * MiB


# ---- 2: failed large requests leave nothing behind --------------------------------------------


def _http_large(port: int, model: str, shape: list[int], nbytes: int, *, bad_json: bool = False) -> int:
    header = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": nbytes}}]}
    ).encode()
    if bad_json:
        header = b"{not json" + b" " * 40
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=header + bytes(nbytes),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        resp = conn.getresponse()
        body = resp.read()  # read whole, not parsed: a 48 MiB answer as JSON text takes seconds to parse
    finally:
        conn.close()
    assert resp.status != 200 or len(body) > nbytes, len(body)  # the answer's JSON carries every element
    return resp.status


def test_failed_large_requests_give_memory_back(
    server: ServerProcess, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """10 large requests of 48 MiB, failed (refused by validation, by a bad header) or served
    with their answer in the worker's message (its output arena, 16 MiB here, cannot hold
    it), over HTTP and gRPC: the router's anonymous memory comes back to where it was,
    without a garbage collection (the server runs with its collector off, see conftest)."""
    nbytes = 48 * MiB
    n = nbytes // 4
    pid = server.pid
    # warm up the paths once (arena segment, grpc buffers) before taking the baseline
    assert _http_large(server.port, "identity_fp32", [n], nbytes) == 200
    time.sleep(2.5)
    baseline = status(pid)["RssAnon"]
    with GoodClient(server.port) as good:
        for _ in range(2):  # each path twice: a request that kept its 48 MiB would show as 96
            assert _http_large(server.port, "add_sub", [n], nbytes) == 400  # wrong shape
            assert _http_large(server.port, "add_sub", [n], nbytes, bad_json=True) == 400
            assert _http_large(server.port, "identity_fp32", [n], nbytes) == 200  # answered in the message
            data = np.zeros(n, np.float32)
            inp = grpcclient.InferInput("INPUT0", [n], "FP32")
            inp.set_data_from_numpy(data)
            with pytest.raises(InferenceServerException):
                grpc_client.infer("add_sub", [inp])
            assert grpc_client.infer("identity_fp32", [inp]).as_numpy("OUTPUT0").nbytes == nbytes
            del data, inp
    good.check(max_latency_s=5.0)

    def settled() -> bool:
        return status(pid)["RssAnon"] < baseline + 48 * MiB

    try:
        wait_for(settled, timeout_s=15)
    except AssertionError:
        now = status(pid)["RssAnon"]
        raise AssertionError(f"router RssAnon {now >> 20} MiB, baseline {baseline >> 20} MiB") from None


# ---- 3: a gRPC stream whose responses are never read --------------------------------------------


def test_unread_grpc_stream_is_bounded(server: ServerProcess) -> None:
    """A client streams 256 KiB requests and never reads a response: the router stops
    reading the stream after a bounded number (--grpc-stream-max-pending 32 here), so its
    memory stays flat, and other clients are served."""
    pid = server.pid
    before = status(pid)["VmRSS"]
    sent = 0
    stop = threading.Event()
    payload = bytes(256 * 1024)
    cap = unread_stream_cap(len(payload), 32)

    def requests() -> Iterator[pb.ModelInferRequest]:
        nonlocal sent
        while not stop.is_set() and sent < cap:
            req = pb.ModelInferRequest(model_name="identity_fp32")
            req.inputs.add(name="INPUT0", datatype="FP32", shape=[len(payload) // 4])
            req.raw_input_contents.append(payload)
            sent += 1
            yield req

    channel = grpc.insecure_channel(
        server.grpc_url, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    )
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    call = stub.ModelStreamInfer(requests())
    try:
        with GoodClient(server.port) as good:
            time.sleep(4)
            stalled_at = sent
            time.sleep(2)
        good.check()
        # reading stopped: the client's generator is not drained any further
        # what gRPC itself buffers on both sides, plus the 32 pending, and not all it was offered
        assert sent == stalled_at and sent < cap, (sent, cap)
        assert status(pid)["VmRSS"] < before + 200 * MiB
    finally:
        stop.set()
        call.cancel()
        channel.close()


# ---- 4: HTTP bodies -------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_answered_at_once(server: ServerProcess) -> None:
    for extra in ("", "Expect: 100-continue"):
        answer, took = raw_http(server.port, post_head(3 << 30, extra=extra))
        assert status_of(answer) == 413 and b"Connection: close" in answer, answer
        assert b"--http-max-body-size" in answer and b"100 Continue" not in answer
        assert took < 2.0


def test_chunked_body_over_the_limit(server: ServerProcess) -> None:
    chunk = b"%x\r\n%s\r\n" % (MiB, b"\0" * MiB)
    parts = (chunk,) * 80 + (b"0\r\n\r\n",)
    answer, _ = raw_http(server.port, post_head(None), parts)
    assert status_of(answer) == 413, answer


def test_gzip_bomb(server: ServerProcess) -> None:
    """1 GiB of zeros in about 1 MB of gzip: answered 413 once 64 MiB have come out, at a
    peak cost near the limit, while other clients are served."""
    bomb = gzip.compress(b"\0" * (1 << 30), compresslevel=9)
    pid = server.pid
    reset_peak(pid)
    before = status(pid)["VmRSS"]
    with GoodClient(server.port) as good:
        answer, took = raw_http(server.port, post_head(len(bomb), encoding="gzip"), (bomb,))
    good.check()
    assert status_of(answer) == 413, answer
    assert took < 10
    peak = status(pid)["VmHWM"]
    assert peak < before + 64 * MiB + 160 * MiB, (before >> 20, peak >> 20)


@pytest.mark.parametrize(
    ("encoding", "body", "fragment"),
    [
        ("gzip", b"0123456789", b"failed to decompress"),
        ("deflate", b"\x78\x9c" + b"\xff" * 20, b"failed to decompress"),
        ("deflate", zlib.compress(b'{"inputs": []}' * 50)[:-6], b"truncated"),
        ("gzip", gzip.compress(b"{}") + b"trailing", b"after the end"),
        ("br", b"whatever", b"unsupported Content-Encoding"),
    ],
    ids=["gzip garbage", "deflate garbage", "truncated deflate", "trailing data", "unknown encoding"],
)
def test_bad_compressed_bodies(server: ServerProcess, encoding: str, body: bytes, fragment: bytes) -> None:
    answer, took = raw_http(server.port, post_head(len(body), encoding=encoding) + body)
    assert status_of(answer) in (400, 501) and fragment in answer, answer
    assert took < 2.0


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_stalled_body_is_answered_408(server: ServerProcess, framing: str) -> None:
    """Declared length (the fast path reads it) or chunked (aiohttp does): 408, and a log line
    saying the connection was still reading (the client stopped, not the server)."""
    log_at = len(server.lines)
    head = post_head(1000) + b'{"inputs"' if framing == "length" else post_head(None) + b'9\r\n{"inputs"'
    with GoodClient(server.port) as good:
        answer, took = raw_http(server.port, head)
    good.check()
    assert status_of(answer) == 408 and b"--http-body-timeout-secs" in answer, answer
    assert 2.5 < took < 8
    fast = r"got 9 of 1000 body bytes; reading: True, held: False"
    tail = fast if framing == "length" else r"reading: True \(aiohttp's\)"
    server.wait_log(r"HTTP /v2/models/add_sub/infer: timed out reading the request body.*" + tail, start=log_at)


def test_buffered_bytes_budget(tmp_path: Path, fresh: list[ServerProcess], repo: Path) -> None:
    """Bodies held at once are bounded for all clients together: with a 32 MiB budget, a
    second 24 MiB body (or gRPC message) arriving while the first one is held gets 429
    (RESOURCE_EXHAUSTED)."""
    srv = limited(repo, "--max-buffered-request-bytes", str(32 * MiB), "--http-body-timeout-secs", "5").start()
    fresh.append(srv)
    first = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    try:
        # the first body is declared and half sent: its 24 MiB are counted while it is read
        first.sendall(post_head(24 * MiB) + bytes(12 * MiB))
        time.sleep(0.5)
        code, body = request(
            srv.port, "POST", "/v2/models/add_sub/infer", bytes(24 * MiB), {"Inference-Header-Content-Length": "0"}
        )
        assert code == 429 and "--max-buffered-request-bytes" in body["error"], body
        # a gRPC message counts in the same budget
        g = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            inp = grpcclient.InferInput("INPUT0", [6 * MiB], "FP32")
            inp.set_data_from_numpy(np.zeros(6 * MiB, np.float32))
            with pytest.raises(InferenceServerException) as err:
                g.infer("identity_fp32", [inp])
            assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "--max-buffered-request-bytes" in str(
                err.value
            )
        finally:
            g.close()
    finally:
        first.close()
    # once the first one is gone, the budget is free again
    wait_for(lambda: request(srv.port, "POST", "/v2/models/add_sub/infer", bytes(24 * MiB))[0] == 400)
