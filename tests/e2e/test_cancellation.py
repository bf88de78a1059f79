"""``request.is_cancelled()``: a model sees its client go away (a gRPC call cancelled by the
client's timeout, a streamed request cancelled, an HTTP client that disconnects) or the
request's deadline pass, and can stop early."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("cancellable", "repeat"))


def _input() -> list[grpcclient.InferInput]:
    i = grpcclient.InferInput("INPUT0", [1], "FP32")
    i.set_data_from_numpy(np.ones(1, np.float32))
    return [i]


def _seen(marker: Path, within_s: float = 5.0) -> float:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            return float(marker.read_text())
        time.sleep(0.05)
    raise AssertionError("the model did not see the cancellation")


def test_grpc_client_timeout_cancels_the_request(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "grpc"
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="Deadline"):
            c.infer("cancellable", _input(), parameters={"marker": str(marker)}, client_timeout=0.5)
        assert _seen(marker) < 3.0
    finally:
        c.close()


def test_request_timeout_parameter_cancels_the_request(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "deadline"
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="deadline"):
            c.infer("cancellable", _input(), parameters={"marker": str(marker)}, timeout=400_000)
        assert _seen(marker) < 3.0
    finally:
        c.close()


def test_http_client_that_disconnects_cancels_the_request(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "http"
    body = orjson.dumps(
        {
            "inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            "parameters": {"marker": str(marker)},
        }
    )
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port))) as s:
        head = f"POST /v2/models/cancellable/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body)
        time.sleep(0.3)
    assert _seen(marker) < 3.0


def test_cancelled_stream_reaches_a_decoupled_model(server: ServerProcess) -> None:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got: list[object] = []
    c.start_stream(callback=lambda result, error: got.append(result))
    i = grpcclient.InferInput("IN", [500], "INT32")
    i.set_data_from_numpy(np.arange(500, dtype=np.int32))
    c.async_stream_infer("repeat", [i], parameters={"mode": "slow"})
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    c.stop_stream(cancel_requests=True)
    c.close()
    # the repeat model stops sending once it sees the cancellation (it would take 10 s)
    deadline = time.monotonic() + 5
    while "stopped: cancelled" not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stopped: cancelled" in server.log
