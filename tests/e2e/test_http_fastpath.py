"""The HTTP fast path (``server/frontends/http/fastpath.py``) through the real server: plain
inference requests are answered without aiohttp's machinery, everything else by aiohttp, in
order, on one connection.

Which side answered shows in the ``Server`` header: aiohttp writes one, the fast path none.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository

MODEL = "identity_fp32"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), MODEL, "slow")
    srv = ServerProcess(repo, "--http-keepalive-timeout-secs", "2", "--http-body-timeout-secs", "2").start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


def infer_request(
    values: list[float], *, model: str = MODEL, extra: str = "", binary: bool = True, params: dict | None = None
) -> bytes:
    data = np.asarray(values, np.float32)
    header: dict[str, object]
    if binary:
        header = {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [len(values)],
                    "parameters": {"binary_data_size": data.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    else:
        header = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [len(values)], "data": values}]}
    lines: list[str] = []
    if params:
        header["parameters"] = params
    if not binary:
        body = json.dumps(header).encode()
    else:
        hb = json.dumps(header).encode()
        body = hb + data.tobytes()
        lines = [f"Inference-Header-Content-Length: {len(hb)}"]
    head = [f"POST /v2/models/{model}/infer HTTP/1.1", "Host: shoal", f"Content-Length: {len(body)}", *lines]
    if extra:
        head.append(extra)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Reader:
    """HTTP/1.1 responses read one by one from a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def output_of(headers: dict[str, str], body: bytes) -> list[float]:
    n = int(headers.get("inference-header-content-length", len(body)))
    meta = json.loads(body[:n])
    out = meta["outputs"][0]
    if n < len(body):
        return np.frombuffer(body[n:], np.float32).tolist()
    return [float(v) for v in out["data"]]


CONFIG = b"GET /v2/models/%s/config HTTP/1.1\r\nHost: shoal\r\n\r\n" % MODEL.encode()
READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: shoal\r\n\r\n"


def connect(server: ServerProcess) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock, Reader(sock)


def test_pipelined_requests_keep_their_order(server: ServerProcess) -> None:
    """Fast and aiohttp-answered requests sent in one write come back in the order sent,
    each with its own answer (once aiohttp holds one, those behind it go to aiohttp too)."""
    sock, reader = connect(server)
    try:
        sock.sendall(
            infer_request([1.0])
            + CONFIG
            + infer_request([2.0, 2.5], binary=False)
            + infer_request([3.0], extra="Accept-Encoding: gzip")
            + infer_request([4.0])
            + READY
            + infer_request([5.0])
        )
        answers = [reader.response() for _ in range(7)]
    finally:
        sock.close()
    assert [a[0] for a in answers] == [200] * 7, answers
    assert "server" not in answers[0][1]
    assert output_of(answers[0][1], answers[0][2]) == [1.0]
    assert json.loads(answers[1][2])["name"] == MODEL
    assert output_of(answers[2][1], answers[2][2]) == [2.0, 2.5]
    assert answers[3][1]["content-encoding"] == "gzip"
    assert output_of(answers[3][1], gzip.decompress(answers[3][2])) == [3.0]
    assert output_of(answers[4][1], answers[4][2]) == [4.0]
    assert output_of(answers[6][1], answers[6][2]) == [5.0]


def test_pipelined_large_requests_to_a_slow_reader(server: ServerProcess) -> None:
    """Eight 1 MiB requests in one write, answers read only after a pause, on a socket with
    a small receive buffer: the server holds its reading while it answers (more than 1 MiB
    waits) and its writes back up at the same time. All eight are answered in order. (The
    fast path's reading hold once shared its flag with aiohttp's writing pause: the fifth
    request got a 408 with all its bytes sent, and "pause_writing() failed" was logged.)"""
    n = 1 << 18
    one = infer_request(np.arange(n, dtype=np.float32).tolist())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    log_at = len(server.log)
    try:
        sender = threading.Thread(target=sock.sendall, args=(one * 8,))
        sender.start()
        time.sleep(1.0)  # the first answers back up in the server meanwhile
        reader = Reader(sock)
        answers = [reader.response() for _ in range(8)]
        sender.join(30)
    finally:
        sock.close()
    assert [a[0] for a in answers] == [200] * 8, [(a[0], a[2][:200]) for a in answers if a[0] != 200]
    expected = np.arange(n, dtype=np.float32)
    for headers, body in ((a[1], a[2]) for a in answers):
        np.testing.assert_array_equal(output_of(headers, body), expected)
    assert "pause_writing() failed" not in server.log[log_at:], server.log[log_at:]


def test_large_requests_handed_to_aiohttp_are_answered(server: ServerProcess) -> None:
    """A 640 kB request that aiohttp answers (its client accepts gzip) pipelined behind a
    slow one the fast path answers: it waits whole in the fast path's buffer, then goes to
    aiohttp in one piece. That is more than aiohttp's body buffer holds (512 KiB), so its
    flow control pauses its parser before the message is complete, and resumes it by feeding
    itself an empty read. The fast path once swallowed that empty read when all of the body
    was handed over already: the request hung until its 408, with every byte sent. Then
    1 MiB requests through tritonclient (``response_compression_algorithm``), where the same
    happened at times: when the body's last read filled aiohttp's buffer (the first request
    of a fresh server, 1 run in 5 here)."""
    data = np.arange(160_000, dtype=np.float32)
    big = infer_request(data.tolist(), extra="Accept-Encoding: gzip")
    sock, reader = connect(server)
    try:
        for k in range(3):
            sock.sendall(infer_request([float(k)], model="slow", params={"delay_ms": 300}) + big)
            status, headers, body = reader.response()
            assert status == 200 and "server" not in headers and output_of(headers, body) == [float(k)]
            status, headers, body = reader.response()
            assert status == 200, body[:300]
            assert "server" in headers  # aiohttp's answer
            np.testing.assert_array_equal(output_of(headers, gzip.decompress(body)), data)
    finally:
        sock.close()
    n = 1 << 18
    data = np.arange(n, dtype=np.float32)
    client = httpclient.InferenceServerClient(server.url, connection_timeout=30, network_timeout=30)
    try:
        for k in range(4):
            inp = httpclient.InferInput("INPUT0", [n], "FP32")
            inp.set_data_from_numpy(data + k, binary_data=True)
            out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
            result = client.infer(MODEL, [inp], outputs=[out], response_compression_algorithm="gzip")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data + k)
    finally:
        client.close()


def test_one_connection_switches_between_the_two(server: ServerProcess) -> None:
    """Request by request on one connection: each plain inference request is answered by the
    fast path, each other request by aiohttp."""
    sock, reader = connect(server)
    sent = [
        (infer_request([1.0]), False),
        (CONFIG, True),
        (infer_request([2.0, 2.5], binary=False), False),
        (infer_request([3.0], extra="Accept-Encoding: gzip"), True),
        (infer_request([4.0], extra="Connection: close"), True),
    ]
    try:
        for i, (req, by_aiohttp) in enumerate(sent):
            sock.sendall(req)
            status, headers, body = reader.response()
            assert status == 200, body
            assert ("server" in headers) == by_aiohttp, (i, headers)
        with pytest.raises(ConnectionError):  # Connection: close was honoured
            reader.response()
    finally:
        sock.close()


def test_body_in_pieces(server: ServerProcess) -> None:
    """A request whose body comes in several writes is gathered and answered once whole;
    the next request on the connection follows."""
    values = [float(i) for i in range(50_000)]
    req = infer_request(values)
    sock, reader = connect(server)
    try:
        cut = req.index(b"\r\n\r\n") + 4
        for part in (req[: cut - 3], req[cut - 3 : cut + 100], req[cut + 100 : cut + 70_000], req[cut + 70_000 :]):
            sock.sendall(part)
            time.sleep(0.05)
        status, headers, body = reader.response()
        assert status == 200 and "server" not in headers
        assert output_of(headers, body) == values
        sock.sendall(infer_request([7.0]))
        status, headers, body = reader.response()
        assert status == 200 and output_of(headers, body) == [7.0]
    finally:
        sock.close()


def test_stalled_body_gets_408(server: ServerProcess) -> None:
    sock, reader = connect(server)
    try:
        req = infer_request([1.0, 2.0, 3.0])
        sock.sendall(req[:-5])
        t0 = time.monotonic()
        status, headers, body = reader.response()
        took = time.monotonic() - t0
        assert status == 408 and "--http-body-timeout-secs" in json.loads(body)["error"], body
        assert 1.5 < took < 6, took
        assert headers.get("connection") == "close"
        with pytest.raises(ConnectionError):
            reader.response()
    finally:
        sock.close()
    # the log says what the connection was doing: reading (the client stopped), 5 bytes short
    n = len(req) - req.index(b"\r\n\r\n") - 4
    server.wait_log(rf"got {n - 5} of {n} body bytes; reading: True, held: False, answering: False", timeout_s=5)


def test_errors_from_the_fast_path(server: ServerProcess) -> None:
    """Bad requests get the router's error texts and status, and the connection stays usable."""
    sock, reader = connect(server)
    try:
        sock.sendall(infer_request([1.0], model="no_such_model"))
        status, headers, body = reader.response()
        assert status == 400 and "server" not in headers  # as Triton answers it
        assert "no_such_model" in json.loads(body)["error"]
        bad = b'{"inputs": [{"name": "NOPE", "datatype": "FP32", "shape": [1], "data": [1]}]}'
        sock.sendall(
            b"POST /v2/models/%s/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MODEL.encode(), len(bad)) + bad
        )
        status, _, body = reader.response()
        assert status == 400 and "NOPE" in json.loads(body)["error"], body
        sock.sendall(infer_request([9.0]))
        status, headers, body = reader.response()
        assert status == 200 and output_of(headers, body) == [9.0]
    finally:
        sock.close()


def test_keepalive_timer_counts_from_the_last_answer(server: ServerProcess) -> None:
    """A connection that keeps sending fast requests outlives the 2 s keep-alive timeout;
    once idle for it, the server closes it."""
    sock, reader = connect(server)
    try:
        deadline = time.monotonic() + 4.5
        n = 0
        while time.monotonic() < deadline:
            sock.sendall(infer_request([float(n)]))
            status, headers, body = reader.response()
            assert status == 200 and output_of(headers, body) == [float(n)]
            n += 1
            time.sleep(0.3)
        time.sleep(3.5)
        sock.settimeout(5)
        assert sock.recv(10) == b""  # closed by the server
    finally:
        sock.close()


def test_long_request_outlives_the_keepalive_timeout(server: ServerProcess) -> None:
    """An answer that takes longer than the keep-alive timeout is still delivered."""
    sock, reader = connect(server)
    try:
        t0 = time.monotonic()
        sock.sendall(infer_request([3.0], model="slow", params={"delay_ms": 3000}))
        status, headers, body = reader.response()
        assert status == 200 and "server" not in headers, body
        assert output_of(headers, body) == [3.0] and time.monotonic() - t0 > 2.9
    finally:
        sock.close()


def test_client_that_leaves_does_not_hurt_others(server: ServerProcess) -> None:
    """Clients that disconnect with requests in flight (whole or half sent) leave the server
    serving others."""
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        req = infer_request([1.0] * 1000)
        s.sendall(req[: len(req) // 2] if _ % 2 else req)
        s.close()
    c = httpclient.InferenceServerClient(server.url)
    try:
        inp = httpclient.InferInput("INPUT0", [3], "FP32")
        inp.set_data_from_numpy(np.array([1, 2, 3], np.float32))
        assert c.infer(MODEL, [inp]).as_numpy("OUTPUT0").tolist() == [1, 2, 3]
    finally:
        c.close()


def test_many_clients_at_once(server: ServerProcess) -> None:
    """tritonclient from 16 threads, each its own connection: every answer is its own."""
    errors: list[str] = []

    def run(k: int) -> None:
        c = httpclient.InferenceServerClient(server.url)
        try:
            for i in range(30):
                data = np.full(k + 1, float(k * 1000 + i), np.float32)
                inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
                inp.set_data_from_numpy(data, binary_data=bool(i % 2))
                got = c.infer(MODEL, [inp]).as_numpy("OUTPUT0")
                if got.tolist() != data.tolist():
                    errors.append(f"{k}/{i}: {got[:3]}")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_off_switch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``SHOAL_HTTP_FASTPATH=0``: aiohttp answers inference requests too."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), MODEL)
    srv = ServerProcess(repo, env={"SHOAL_HTTP_FASTPATH": "0"}).start()
    try:
        sock, reader = connect(srv)
        try:
            sock.sendall(infer_request([1.0]))
            status, headers, body = reader.response()
            assert status == 200 and "server" in headers and output_of(headers, body) == [1.0]
        finally:
            sock.close()
    finally:
        assert srv.terminate() == 0, srv.log
