"""``shoal serve --frontend-processes N`` through the real server: the router holds the public
ports and N frontend processes (``server/frontproc``) serve them. Inference requests (HTTP
and gRPC ``ModelInfer``, and each request of a gRPC ``ModelStreamInfer`` stream) are decoded
in a frontend and submitted to the router over its worker channel; every other call (and a
traced or raw-binary inference request) is forwarded to the router's own HTTP and gRPC
servers on Unix sockets.

Most checks compare a server with frontend processes (``server``) against a plain one over
the same repository (``plain``): the same request must get the same answer (status, error
text, response bytes or message). Then shared memory, tracing, a frontend process that dies,
graceful shutdown, a router that dies, and the command line."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.e2e.server import ROOT, ServerProcess, make_repository, unread_stream_cap, wait_until
from tests.e2e.test_stream_flow import CONFIG as FLOOD_CONFIG
from tests.e2e.test_stream_flow import FLOOD as FLOOD_MODEL
from tests.e2e.test_stream_flow import N as FLOOD_N
from tests.e2e.test_trace import STAMPS_GRPC, STAMPS_HTTP, _traces
from tests.e2e.test_tritonserver_cli import PARAMS_CONFIG, PARAMS_MODEL

pytestmark = pytest.mark.timeout(180)

MODELS = (
    "add_sub",
    "identity_fp32",
    "strings",
    "classifier",
    "echo_all",
    "accumulator",
    "repeat",
    "tokens",
    "slow",
    "cancellable",
)
FRONTENDS = ("--frontend-processes", "2")
SMALL_ARENAS = (
    "--worker-arena-bytes",
    str(4 << 20),
    "--shm-arena-bytes",
    str(4 << 20),
    "--shm-arena-max-bytes",
    str(64 << 20),
)
"""A worker's output arena is then 64 MiB at most (16 segments), as is the router's input
arena: outputs or inputs that are never given back exhaust them after ~64 requests of 1 MiB."""
KEY_PREFIX = f"shoaltest_{os.getpid()}_"
SERVICE = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/Check"
CLEAR = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}


# ---- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), *MODELS)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces") / "trace.json"


@pytest.fixture(scope="module")
def server(repo: Path, trace_file: Path) -> Iterator[ServerProcess]:
    """Two frontend processes, small arenas; tracing can be turned on (a trace file, level OFF
    at first).
    (Named ``server`` so that a failing test shows its log.)"""
    srv = ServerProcess(repo, *FRONTENDS, *SMALL_ARENAS, "--trace-config", f"triton,file={trace_file}").start()
    assert "2 frontend processes serve the HTTP and gRPC ports" in srv.log
    assert len(frontend_pids(srv)) == 2, srv.log
    yield srv
    pid = srv.pid
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), srv.segments()
    assert not frontends_alive(pid), "frontend processes outlived their router"
    assert "did not stop in time" not in srv.log, srv.log


@pytest.fixture(scope="module")
def plain(repo: Path) -> Iterator[ServerProcess]:
    """The same repository served by the router alone (the reference)."""
    srv = ServerProcess(repo).start()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), srv.segments()


@pytest.fixture(scope="module")
def channels(server: ServerProcess, plain: ServerProcess) -> Iterator[dict[str, grpc.Channel]]:
    chans = {"frontends": _channel(server), "plain": _channel(plain)}
    yield chans
    for c in chans.values():
        c.close()


def _channel(srv: ServerProcess) -> grpc.Channel:
    """A channel without gRPC's 4 MiB default limit on messages."""
    return grpc.insecure_channel(
        srv.grpc_url, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def hclient(srv: ServerProcess) -> httpclient.InferenceServerClient:
    c = httpclient.InferenceServerClient(srv.url)
    _OPEN.append(c)
    return c


def gclient(srv: ServerProcess) -> grpcclient.InferenceServerClient:
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    _OPEN.append(c)
    return c


# ---- processes ----------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is gone (its parent has not reaped it yet)
        return None
    return int(fields[1])


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def frontend_pids(srv: ServerProcess) -> list[int]:
    """The live frontend processes of ``srv`` (its children running ``shoal.server.frontproc``)."""
    return sorted(p for p in _pids() if _ppid(p) == srv.pid and "shoal.server.frontproc" in _cmdline(p))


def frontends_alive(router_pid: int) -> list[int]:
    """Frontend processes of the router ``router_pid`` still running, whoever their parent is
    now (their ``--run-dir`` names the router's pid)."""
    mark = f"/shoal_{router_pid}_"
    out = []
    for p in _pids():
        cmd = _cmdline(p)
        if "shoal.server.frontproc" in cmd and any(mark in a for a in cmd) and _ppid(p) is not None:
            out.append(p)
    return out


# ---- raw HTTP and gRPC ----------------------------------------------------------------------------


CHUNKED = {"Transfer-Encoding": "chunked"}
"""As a header of ``http_call``: the body goes in chunks (no Content-Length)."""


def http_call(
    srv: ServerProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(srv.url, timeout=timeout_s)
    try:
        headers = dict(headers or {})
        if headers.pop("Transfer-Encoding", None) == "chunked" and body is not None:
            mid = len(body) // 2
            conn.request(method, path, body=iter([body[:mid], body[mid:]]), headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def comparable(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
    """An HTTP answer without what differs from one response to the next."""
    status, headers, data = answer
    return status, {k: v for k, v in headers.items() if k not in ("date", "server")}, data


Answer = tuple[int, dict[str, str], bytes]


def both_answers(
    server: ServerProcess, plain: ServerProcess, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[Answer, Answer]:
    """The same HTTP request to the server with frontend processes and to the one without:
    their ``comparable`` answers."""
    return (
        comparable(http_call(server, method, path, body, headers)),
        comparable(http_call(plain, method, path, body, headers)),
    )


def grpc_raw(channel: grpc.Channel, method: str, request: bytes) -> tuple[str, bytes | str]:
    """``("OK", response bytes)`` or ``(code name, details)`` of a unary call of raw bytes."""
    call: Any = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return "OK", call(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def grpc_msg(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> tuple[str, Any]:
    code, out = grpc_raw(
        channel, SERVICE + method if not method.startswith("/") else method, request.SerializeToString()
    )
    if code == "OK":
        assert isinstance(out, bytes)
        return code, response_type.FromString(out)
    return code, out


def infer_json(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def fp32(name: str, values: list[float]) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": [len(values)], "data": values}


def binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {"Inference-Header-Content-Length": str(len(head))}


A = [1.0, 2.0, 3.0, 4.0]
B = [0.5, 0.5, -1.0, 10.0]
ADD_SUB = infer_json(fp32("INPUT0", A), fp32("INPUT1", B))


def _http_infer_cases() -> list[tuple[str, str, bytes, dict[str, str]]]:
    add = "/v2/models/add_sub/infer"
    big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: its output goes by the worker's arena
    bin_in, bin_headers = binary_body(
        {
            "id": "bin-in",
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
                {"name": "INPUT1", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
            ],
            "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
        },
        np.array(A, np.float32).tobytes(),
        np.array(B, np.float32).tobytes(),
    )
    big_body, big_headers = binary_body(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [big.size],
                    "parameters": {"binary_data_size": big.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        big.tobytes(),
    )
    strings = {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 3], "data": ["ab", "", "\u00e9t\u00e9"]}
    two = serialize_byte_tensor(np.array([b"x", b"yz"], dtype=object)).item()
    bytes_in, bytes_headers = binary_body(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2], "parameters": {"binary_data_size": len(two)}}
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}, {"name": "OUTPUT1"}],
        },
        two,
    )
    echo = [
        {"name": "IN_BOOL", "datatype": "BOOL", "shape": [3], "data": [True, False, True]},
        {"name": "IN_UINT8", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
        {"name": "IN_INT16", "datatype": "INT16", "shape": [2], "data": [-32768, 7]},
        {"name": "IN_UINT64", "datatype": "UINT64", "shape": [1], "data": [18446744073709551615]},
        {"name": "IN_INT64", "datatype": "INT64", "shape": [2], "data": [-9223372036854775808, 1]},
        {"name": "IN_FP64", "datatype": "FP64", "shape": [2], "data": [1e300, -0.0]},
        {"name": "IN_BYTES", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]},
    ]
    x = [[0.1, 0.7, 0.05, 0.15], [4.0, 1.0, 3.0, 2.0]]
    classify = {"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "data": x}
    gz = gzip.compress(ADD_SUB)
    return [
        ("json outputs with id", add, infer_json(fp32("INPUT0", A), fp32("INPUT1", B), id="req-7"), {}),
        ("version path", "/v2/models/add_sub/versions/1/infer", ADD_SUB, {}),
        (
            "binary_data_output",
            add,
            infer_json(fp32("INPUT0", A), fp32("INPUT1", B), parameters={"binary_data_output": True}),
            {},
        ),
        (
            "per-output binary_data",
            add,
            infer_json(
                fp32("INPUT0", A),
                fp32("INPUT1", B),
                outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}, {"name": "OUTPUT1"}],
            ),
            {},
        ),
        (
            "one output asked for",
            add,
            infer_json(fp32("INPUT0", A), fp32("INPUT1", B), outputs=[{"name": "OUTPUT1"}]),
            {},
        ),
        ("binary inputs", add, bin_in, bin_headers),
        (
            "request parameters reach the model",
            "/v2/models/slow/infer",
            infer_json(fp32("INPUT0", A), id="p", parameters={"delay_ms": 5, "note": "x"}),
            {},
        ),
        ("empty tensor", "/v2/models/identity_fp32/infer", infer_json(fp32("INPUT0", [])), {}),
        ("4 MiB in and out", "/v2/models/identity_fp32/infer", big_body, big_headers),
        ("BYTES as JSON", "/v2/models/strings/infer", infer_json(strings), {}),
        ("BYTES binary", "/v2/models/strings/infer", bytes_in, bytes_headers),
        ("every datatype", "/v2/models/echo_all/infer", infer_json(*echo), {}),
        (
            "classification",
            "/v2/models/classifier/infer",
            infer_json(
                classify,
                outputs=[
                    {"name": "SCORES", "parameters": {"classification": 2}},
                    {"name": "COUNTS", "parameters": {"classification": 9, "binary_data": True}},
                ],
            ),
            {},
        ),
        ("gzip request body", add, gz, {"Content-Encoding": "gzip"}),
        ("gzip response", add, ADD_SUB, {"Accept-Encoding": "gzip"}),
        ("expect 100-continue", add, ADD_SUB, {"Expect": "100-continue"}),
        ("chunked body", add, ADD_SUB, CHUNKED),
        (
            "raw binary body (forwarded)",
            "/v2/models/identity_fp32/infer",
            np.array(A, np.float32).tobytes(),
            {"Inference-Header-Content-Length": "0"},
        ),
    ]


HTTP_INFER_CASES = _http_infer_cases()


@pytest.mark.parametrize(
    ("path", "body", "headers"), [c[1:] for c in HTTP_INFER_CASES], ids=[c[0] for c in HTTP_INFER_CASES]
)
def test_http_infer_answers_as_without_frontends(
    server: ServerProcess, plain: ServerProcess, path: str, body: bytes, headers: dict[str, str]
) -> None:
    got, want = both_answers(server, plain, "POST", path, body, headers)
    assert want[0] == 200, want
    assert got == want


def test_http_infer_with_tritonclient(server: ServerProcess, plain: ServerProcess) -> None:
    """tritonclient's own requests (binary inputs; each output's format, class counts, ids,
    parameters) get the same responses."""
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 3, dtype=np.float32)

    def run(srv: ServerProcess) -> list[tuple[Any, dict[str, np.ndarray]]]:
        c = hclient(srv)
        out = []
        for binary_in in (True, False):
            inputs = []
            for name, arr in (("INPUT0", a), ("INPUT1", b)):
                t = httpclient.InferInput(name, [4], "FP32")
                t.set_data_from_numpy(arr, binary_data=binary_in)
                inputs.append(t)
            for outputs in (
                None,  # every output, binary (tritonclient asks binary_data_output)
                [httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)],
                [
                    httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                    httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
                ],
                [httpclient.InferRequestedOutput("OUTPUT1", binary_data=True, class_count=2)],
            ):
                r = c.infer("add_sub", inputs, outputs=outputs, request_id=f"tc-{binary_in}", parameters={"k": 1})
                resp = r.get_response()
                out.append((resp, {o["name"]: r.as_numpy(o["name"]) for o in resp["outputs"]}))
        return out

    got, want = run(server), run(plain)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            np.testing.assert_array_equal(g[name], w[name])
    np.testing.assert_array_equal(got[0][1]["OUTPUT0"], a + b)
    np.testing.assert_array_equal(got[0][1]["OUTPUT1"], a - b)
    assert got[0][0]["id"] == "tc-True" and got[0][0]["model_name"] == "add_sub"
    assert got[0][0]["model_version"] == "1"


# ---- gRPC inference --------------------------------------------------------------------------------


def _grpc_infer_cases() -> list[tuple[str, service_pb2.ModelInferRequest]]:
    cases = []
    raw = service_pb2.ModelInferRequest(model_name="add_sub", id="g-1")
    raw.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    raw.inputs.add(name="INPUT1", datatype="FP32", shape=[4])
    raw.raw_input_contents.extend([np.array(A, np.float32).tobytes(), np.array(B, np.float32).tobytes()])
    raw.parameters["k"].int64_param = 3
    raw.parameters["s"].string_param = "v"
    cases.append(("raw contents, id, parameters", raw))
    typed = service_pb2.ModelInferRequest(model_name="add_sub", model_version="1")
    typed.inputs.add(name="INPUT0", datatype="FP32", shape=[4]).contents.fp32_contents.extend(A)
    typed.inputs.add(name="INPUT1", datatype="FP32", shape=[4]).contents.fp32_contents.extend(B)
    typed.outputs.add(name="OUTPUT1")
    cases.append(("typed contents, version, one output", typed))
    cls = service_pb2.ModelInferRequest(model_name="classifier")
    cls.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        [0.1, 0.7, 0.05, 0.15, 4.0, 1.0, 3.0, 2.0]
    )
    cls.outputs.add(name="SCORES").parameters["classification"].int64_param = 2
    cls.outputs.add(name="COUNTS")
    cases.append(("classification", cls))
    st = service_pb2.ModelInferRequest(model_name="strings")
    st.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 3]).contents.bytes_contents.extend([b"ab", b"", b"xyz"])
    cases.append(("BYTES", st))
    big = service_pb2.ModelInferRequest(model_name="identity_fp32")
    big.inputs.add(name="INPUT0", datatype="FP32", shape=[1 << 20])
    big.raw_input_contents.append(np.arange(1 << 20, dtype=np.float32).tobytes())
    cases.append(("4 MiB in and out", big))
    empty = service_pb2.ModelInferRequest(model_name="identity_fp32")
    empty.inputs.add(name="INPUT0", datatype="FP32", shape=[0])
    empty.raw_input_contents.append(b"")
    cases.append(("empty tensor", empty))
    echo = service_pb2.ModelInferRequest(model_name="echo_all")
    echo.inputs.add(name="IN_BOOL", datatype="BOOL", shape=[2]).contents.bool_contents.extend([True, False])
    echo.inputs.add(name="IN_UINT64", datatype="UINT64", shape=[1]).contents.uint64_contents.append(2**64 - 1)
    echo.inputs.add(name="IN_INT8", datatype="INT8", shape=[2]).contents.int_contents.extend([-128, 127])
    echo.inputs.add(name="IN_FP64", datatype="FP64", shape=[1]).contents.fp64_contents.append(-2.5)
    cases.append(("several datatypes", echo))
    return cases


GRPC_INFER_CASES = _grpc_infer_cases()


@pytest.mark.parametrize("request_", [c[1] for c in GRPC_INFER_CASES], ids=[c[0] for c in GRPC_INFER_CASES])
def test_grpc_infer_answers_as_without_frontends(
    channels: dict[str, grpc.Channel], request_: service_pb2.ModelInferRequest
) -> None:
    got = grpc_msg(channels["frontends"], "ModelInfer", request_, service_pb2.ModelInferResponse)
    want = grpc_msg(channels["plain"], "ModelInfer", request_, service_pb2.ModelInferResponse)
    assert want[0] == "OK", want
    assert got == want


def test_grpc_infer_with_tritonclient(server: ServerProcess, plain: ServerProcess) -> None:
    a = np.arange(4, dtype=np.float32)

    def run(srv: ServerProcess) -> list[Any]:
        c = gclient(srv)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = grpcclient.InferInput(name, [4], "FP32")
            t.set_data_from_numpy(a)
            inputs.append(t)
        out = []
        for outputs in (None, [grpcclient.InferRequestedOutput("OUTPUT1", class_count=3)]):
            r = c.infer("add_sub", inputs, outputs=outputs, request_id="gtc", parameters={"p": True, "q": "x", "r": 7})
            out.append(r.get_response())
        return out

    got, want = run(server), run(plain)
    assert got == want
    assert got[0].model_name == "add_sub" and got[0].model_version == "1" and got[0].id == "gtc"
    np.testing.assert_array_equal(np.frombuffer(got[0].raw_output_contents[0], np.float32), a + a)


def test_many_concurrent_requests(server: ServerProcess) -> None:
    """32 threads x 20 requests, half HTTP (JSON or binary outputs, kept-alive or new
    connections), half gRPC: every answer is the request's own."""
    threads, per_thread = 32, 20
    errors: list[BaseException] = []
    answered = [0] * threads

    def http_thread(k: int) -> None:
        conn = http.client.HTTPConnection(server.url, timeout=60)
        try:
            for j in range(per_thread):
                values = [float(k * 1000 + j), float(j), -0.5]
                binary = (j + k) % 2 == 1
                body: dict[str, Any] = {"id": f"h{k}-{j}", "inputs": [fp32("INPUT0", values)]}
                if binary:
                    body["parameters"] = {"binary_data_output": True}
                conn.request("POST", "/v2/models/identity_fp32/infer", body=json.dumps(body).encode())
                resp = conn.getresponse()
                data = resp.read()
                assert resp.status == 200, data
                if binary:
                    n = int(resp.getheader("Inference-Header-Content-Length") or 0)
                    head, out = json.loads(data[:n]), np.frombuffer(data[n:], np.float32)
                else:
                    head = json.loads(data)
                    out = np.array(head["outputs"][0]["data"], np.float32)
                assert head["id"] == f"h{k}-{j}", head
                np.testing.assert_array_equal(out, np.array(values, np.float32))
                answered[k] += 1
                if j % 7 == 6:  # a new connection now and then (maybe to the other frontend)
                    conn.close()
                    conn = http.client.HTTPConnection(server.url, timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            conn.close()

    def grpc_thread(k: int) -> None:
        try:
            with grpc.insecure_channel(server.grpc_url) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for j in range(per_thread):
                    values = np.array([k * 1000 + j, j, 0.25], np.float32)
                    req = service_pb2.ModelInferRequest(model_name="identity_fp32", id=f"g{k}-{j}")
                    req.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
                    req.raw_input_contents.append(values.tobytes())
                    resp = stub.ModelInfer(req, timeout=60)
                    assert resp.id == f"g{k}-{j}" and resp.model_name == "identity_fp32"
                    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32), values)
                    answered[k] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    workers = [
        threading.Thread(target=http_thread if k % 2 == 0 else grpc_thread, args=(k,), daemon=True)
        for k in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not errors, errors[:3]
    assert answered == [per_thread] * threads


def test_outputs_and_inputs_in_arenas_are_given_back(server: ServerProcess) -> None:
    """1 MiB inputs and outputs (in the router's input arena and the worker's output arena,
    read in place by the frontend), answered, and abandoned by clients that close their
    connection or cancel their call: far more than the arenas hold (``SMALL_ARENAS``), so
    any that were never given back would make the last requests fail."""
    n = 1 << 18
    big = np.arange(n, dtype=np.float32)
    body, headers = binary_body(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [n], "parameters": {"binary_data_size": big.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        },
        big.tobytes(),
    )
    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[n])
    req.raw_input_contents.append(big.tobytes())
    raw_request = (
        f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']}\r\n\r\n"
    ).encode() + body

    with _channel(server) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def answered(count: int) -> None:
            conn = http.client.HTTPConnection(server.url, timeout=60)
            try:
                for _ in range(count):
                    conn.request("POST", "/v2/models/identity_fp32/infer", body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    assert resp.status == 200, data[:300]
                    assert data[-big.nbytes :] == big.tobytes()
                    out = stub.ModelInfer(req, timeout=60)
                    assert out.raw_output_contents[0] == big.tobytes()
            finally:
                conn.close()

        answered(40)
        for k in range(40):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(raw_request)
                if k % 2:  # some wait for the status line first
                    sock.recv(1)
            call = stub.ModelInfer.future(req, timeout=60)
            if k % 2:
                time.sleep(0.002)
            call.cancel()
        wait_until(lambda: _outstanding(server, "identity_fp32") == 0, timeout_s=30)
        answered(40)


def test_grpc_deadline_as_without_frontends(channels: dict[str, grpc.Channel]) -> None:
    req = service_pb2.ModelInferRequest(model_name="slow")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    req.parameters["delay_ms"].int64_param = 2000
    for name in ("frontends", "plain"):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channels[name])
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name


def test_grpc_compressed_calls(channels: dict[str, grpc.Channel]) -> None:
    """gzip-compressed messages, to the frontend's own ModelInfer and to a forwarded method."""
    req = service_pb2.ModelInferRequest(model_name="identity_fp32", id="z")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[4096])
    req.raw_input_contents.append(bytes(4 * 4096))
    answers = []
    for name in ("frontends", "plain"):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channels[name])
        out = stub.ModelInfer(req, timeout=60, compression=grpc.Compression.Gzip)
        meta = stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name="identity_fp32"), timeout=60, compression=grpc.Compression.Gzip
        )
        answers.append((out, meta))
    assert answers[0] == answers[1]
    assert answers[0][0].id == "z" and answers[0][0].raw_output_contents[0] == bytes(4 * 4096)


def test_sequence_across_http_and_grpc(server: ServerProcess) -> None:
    """A sequence's requests (sequence_id/start/end parameters) reach the sequence batcher
    through the frontends, whichever protocol each one takes."""
    hc, gc_ = hclient(server), gclient(server)

    def step(client: Any, mod: Any, value: int, **kw: Any) -> tuple[int, int]:
        i = mod.InferInput("INPUT", [1, 1], "INT32")
        i.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        r = client.infer("accumulator", [i], **kw)
        return int(r.as_numpy("OUTPUT")[0][0]), int(r.as_numpy("CORRID_SEEN")[0][0])

    assert step(hc, httpclient, 5, sequence_id=4242, sequence_start=True) == (5, 4242)
    assert step(gc_, grpcclient, 7, sequence_id=4343, sequence_start=True) == (7, 4343)
    assert step(gc_, grpcclient, 10, sequence_id=4242) == (15, 4242)
    assert step(hc, httpclient, 1, sequence_id=4343) == (8, 4343)
    assert step(hc, httpclient, 100, sequence_id=4242, sequence_end=True) == (115, 4242)
    assert step(gc_, grpcclient, 2, sequence_id=4343, sequence_end=True) == (10, 4343)


# ---- errors -----------------------------------------------------------------------------------------


def _http_error_cases() -> list[tuple[str, str, bytes, dict[str, str]]]:
    add = "/v2/models/add_sub/infer"
    bad_size, bad_size_headers = binary_body(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
                fp32("INPUT1", B),
            ]
        },
        bytes(10),
    )
    return [
        ("unknown model", "/v2/models/nope/infer", ADD_SUB, {}),
        ("unknown version", "/v2/models/add_sub/versions/7/infer", ADD_SUB, {}),
        ("version 0", "/v2/models/add_sub/versions/0/infer", ADD_SUB, {}),
        ("wrong shape", add, infer_json(fp32("INPUT0", [1.0, 2.0]), fp32("INPUT1", [1.0, 2.0])), {}),
        (
            "wrong datatype",
            add,
            infer_json({"name": "INPUT0", "datatype": "INT32", "shape": [4], "data": [1, 2, 3, 4]}, fp32("INPUT1", B)),
            {},
        ),
        (
            "unknown datatype",
            add,
            infer_json({"name": "INPUT0", "datatype": "FLOAT", "shape": [4], "data": A}, fp32("INPUT1", B)),
            {},
        ),
        ("data disagrees with shape", add, infer_json(fp32("INPUT0", A[:3]) | {"shape": [4]}, fp32("INPUT1", B)), {}),
        ("missing input", add, infer_json(fp32("INPUT0", A)), {}),
        ("unknown input", add, infer_json(fp32("INPUT0", A), fp32("INPUT1", B), fp32("NOPE", A)), {}),
        ("unknown output", add, infer_json(fp32("INPUT0", A), fp32("INPUT1", B), outputs=[{"name": "NOPE"}]), {}),
        ("malformed JSON", add, b"{not json", {}),
        ("JSON array", add, b"[1, 2]", {}),
        ("empty body", add, b"", {}),
        ("no inputs", add, b"{}", {}),
        ("reserved parameter", add, infer_json(fp32("INPUT0", A), fp32("INPUT1", B), parameters={"triton_x": 1}), {}),
        (
            "bad classification",
            add,
            infer_json(
                fp32("INPUT0", A),
                fp32("INPUT1", B),
                outputs=[{"name": "OUTPUT0", "parameters": {"classification": -1}}],
            ),
            {},
        ),
        ("header length not a number", add, ADD_SUB, {"Inference-Header-Content-Length": "abc"}),
        ("header length past the body", add, ADD_SUB, {"Inference-Header-Content-Length": "100000"}),
        ("binary size mismatch", add, bad_size, bad_size_headers),
        ("unsupported encoding", add, ADD_SUB, {"Content-Encoding": "br"}),
        ("bad gzip", add, b"not gzip at all", {"Content-Encoding": "gzip"}),
        ("raw body for two inputs (forwarded)", add, bytes(16), {"Inference-Header-Content-Length": "0"}),
        (
            "decoupled model",
            "/v2/models/repeat/infer",
            infer_json({"name": "IN", "datatype": "INT32", "shape": [2], "data": [1, 2]}),
            {},
        ),
        (
            "unregistered shared memory",
            add,
            infer_json(
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [4],
                    "parameters": {"shared_memory_region": "nope", "shared_memory_byte_size": 16},
                },
                fp32("INPUT1", B),
            ),
            {},
        ),
    ]


HTTP_ERROR_CASES = _http_error_cases()


@pytest.mark.parametrize(
    ("path", "body", "headers"), [c[1:] for c in HTTP_ERROR_CASES], ids=[c[0] for c in HTTP_ERROR_CASES]
)
def test_http_infer_errors_as_without_frontends(
    server: ServerProcess, plain: ServerProcess, path: str, body: bytes, headers: dict[str, str]
) -> None:
    got, want = both_answers(server, plain, "POST", path, body, headers)
    assert 400 <= want[0] < 600, want
    assert got == want
    assert "error" in json.loads(got[2])


@pytest.mark.parametrize("version", ["abc", "-1"])
def test_http_non_numeric_version_answers_as_without_frontends(
    server: ServerProcess, plain: ServerProcess, version: str
) -> None:
    path = f"/v2/models/add_sub/versions/{version}/infer"
    assert comparable(http_call(server, "POST", path, ADD_SUB)) == comparable(http_call(plain, "POST", path, ADD_SUB))


def test_http_error_texts(server: ServerProcess) -> None:
    """Triton's texts (as tests/e2e/test_error_texts.py has them), not only the plain server's."""
    status, _, data = http_call(
        server,
        "POST",
        "/v2/models/repeat/infer",
        infer_json({"name": "IN", "datatype": "INT32", "shape": [1], "data": [1]}),
    )
    assert (status, json.loads(data)["error"]) == (
        501,
        "HTTP end point doesn't support models with decoupled transaction policy",
    )
    status, _, data = http_call(server, "POST", "/v2/models/nope/infer", ADD_SUB)
    assert (status, json.loads(data)["error"]) == (400, "Request for unknown model: 'nope' is not found")
    status, _, data = http_call(server, "POST", "/v2/models/add_sub/infer", b"{not json")
    assert status == 400 and json.loads(data)["error"].startswith("failed to parse the request JSON")


def _grpc_error_cases() -> list[tuple[str, str, bytes]]:
    def req(model: str = "add_sub", version: str = "") -> service_pb2.ModelInferRequest:
        return service_pb2.ModelInferRequest(model_name=model, model_version=version)

    def add_sub(
        shape0: list[int] | None = None, dt0: str = "FP32", model: str = "add_sub", version: str = ""
    ) -> service_pb2.ModelInferRequest:
        r = req(model, version)
        s0 = shape0 or [4]
        r.inputs.add(name="INPUT0", datatype=dt0, shape=s0)
        r.inputs.add(name="INPUT1", datatype="FP32", shape=[4])
        r.raw_input_contents.extend([bytes(4 * int(np.prod(s0))), bytes(16)])
        return r

    infer = SERVICE + "ModelInfer"
    missing = req()
    missing.inputs.add(name="INPUT0", datatype="FP32", shape=[4]).contents.fp32_contents.extend(A)
    mixed = add_sub()
    mixed.inputs[1].contents.fp32_contents.extend(B)
    no_data = req()
    no_data.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    no_data.inputs.add(name="INPUT1", datatype="FP32", shape=[4])
    out = add_sub()
    out.outputs.add(name="NOPE")
    reserved = add_sub()
    reserved.parameters["triton_x"].int64_param = 1
    decoupled = req("repeat")
    decoupled.inputs.add(name="IN", datatype="INT32", shape=[2]).contents.int_contents.extend([1, 2])
    shm_missing = add_sub()
    shm_missing.raw_input_contents.pop(0)
    shm_missing.raw_input_contents.pop(0)
    shm_missing.inputs[0].parameters["shared_memory_region"].string_param = "nope"
    shm_missing.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    shm_missing.inputs[1].contents.fp32_contents.extend(B)
    return [
        ("unknown model", infer, add_sub(model="nope").SerializeToString()),
        ("unknown version", infer, add_sub(version="7").SerializeToString()),
        ("bad version", infer, add_sub(version="x1").SerializeToString()),
        ("wrong shape", infer, add_sub(shape0=[2]).SerializeToString()),
        ("wrong datatype", infer, add_sub(dt0="INT32").SerializeToString()),
        ("unknown datatype", infer, add_sub(dt0="FLOAT").SerializeToString()),
        ("missing input", infer, missing.SerializeToString()),
        ("raw and typed contents", infer, mixed.SerializeToString()),
        ("no data", infer, no_data.SerializeToString()),
        ("unknown output", infer, out.SerializeToString()),
        ("reserved parameter", infer, reserved.SerializeToString()),
        ("decoupled model", infer, decoupled.SerializeToString()),
        ("unregistered shared memory", infer, shm_missing.SerializeToString()),
        ("malformed message", infer, b"\xff\xff\xff\xff not a protobuf"),
        ("malformed forwarded message", SERVICE + "ModelMetadata", b"\xff\xff\xff\xff not a protobuf"),
    ]


GRPC_ERROR_CASES = _grpc_error_cases()


@pytest.mark.parametrize(
    ("method", "request_"), [c[1:] for c in GRPC_ERROR_CASES], ids=[c[0] for c in GRPC_ERROR_CASES]
)
def test_grpc_errors_as_without_frontends(channels: dict[str, grpc.Channel], method: str, request_: bytes) -> None:
    got = grpc_raw(channels["frontends"], method, request_)
    want = grpc_raw(channels["plain"], method, request_)
    assert want[0] != "OK", want
    assert got == want


def test_unknown_grpc_method(server: ServerProcess, plain: ServerProcess) -> None:
    """Each call on a new channel (a new connection), until one differs from the plain
    server's answer; 300 calls make a miss of a ~3% failure unlikely (1e-4)."""
    with _channel(plain) as ch:
        want = grpc_raw(ch, SERVICE + "NoSuchMethod", b"")
    assert want == ("UNIMPLEMENTED", "Method not found!")
    for _ in range(300):
        with _channel(server) as ch:
            got = grpc_raw(ch, SERVICE + "NoSuchMethod", b"")
        assert got == want


def test_grpc_error_texts(server: ServerProcess) -> None:
    c = gclient(server)
    x = grpcclient.InferInput("IN", [2], "INT32")
    x.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with pytest.raises(InferenceServerException) as err:
        c.infer("repeat", [x])
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    assert err.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"
    with pytest.raises(InferenceServerException) as err:
        c.infer("nope", [x])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message() == "Request for unknown model: 'nope' is not found"
    with grpc.insecure_channel(server.grpc_url) as ch:
        code, details = grpc_raw(ch, SERVICE + "ModelInfer", b"\xff\xff\xff\xff")
    assert (code, details) == ("INVALID_ARGUMENT", "failed to parse the request message")


# ---- forwarded calls -------------------------------------------------------------------------------

FORWARDED_HTTP = [
    ("GET", "/v2", b""),
    ("GET", "/v2/health/live", b""),
    ("GET", "/v2/health/ready", b""),
    ("HEAD", "/v2/health/ready", b""),
    ("POST", "/v2/repository/index?x=1&y=%20", b"CHUNKED"),
    ("GET", "/v2/models/add_sub", b""),
    ("GET", "/v2/models/add_sub/versions/1", b""),
    ("GET", "/v2/models/add_sub/config", b""),
    ("GET", "/v2/models/add_sub/ready", b""),
    ("GET", "/v2/models/repeat/versions/1/ready", b""),
    ("GET", "/v2/models/nope", b""),
    ("GET", "/v2/models/nope/ready", b""),
    ("GET", "/v2/models/add_sub/versions/9/ready", b""),
    ("POST", "/v2/repository/index", b""),
    ("POST", "/v2/repository/index", b'{"ready": true}'),
    ("POST", "/v2/repository/models/add_sub/load", b""),
    ("POST", "/v2/repository/models/add_sub/unload", b""),
    ("GET", "/v2/models/nope/stats", b""),
    ("GET", "/v2/systemsharedmemory/status", b""),
    ("GET", "/v2/systemsharedmemory/region/nope/status", b""),
    ("POST", "/v2/systemsharedmemory/region/x/register", b"{not json"),
    (
        "POST",
        "/v2/cudasharedmemory/region/x/register",
        b'{"raw_handle": {"b64": "AA=="}, "device_id": 0, "byte_size": 4}',
    ),
    ("GET", "/v2/logging", b""),
    ("GET", "/v2/nothing/here", b""),
    ("DELETE", "/v2/models/add_sub/infer", b""),
    ("POST", "/v2/models/add_sub/generate", b'{"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]}'),
    ("POST", "/v2/models/add_sub/generate", b"{not json"),
    ("POST", "/v2/models/add_sub/generate_stream", b'{"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]}'),
]


@pytest.mark.parametrize(("method", "path", "body"), FORWARDED_HTTP, ids=[f"{m} {p}" for m, p, _ in FORWARDED_HTTP])
def test_forwarded_http_calls_answer_as_without_frontends(
    server: ServerProcess, plain: ServerProcess, method: str, path: str, body: bytes
) -> None:
    if body == b"CHUNKED":  # a body in chunks, forwarded
        body, headers = b"{}", CHUNKED
    else:
        headers = {}
    got, want = both_answers(server, plain, method, path, body or None, headers)
    assert got == want


FORWARDED_GRPC: list[tuple[str, Any, Any]] = [
    ("ServerLive", service_pb2.ServerLiveRequest(), service_pb2.ServerLiveResponse),
    ("ServerReady", service_pb2.ServerReadyRequest(), service_pb2.ServerReadyResponse),
    ("ModelReady", service_pb2.ModelReadyRequest(name="add_sub"), service_pb2.ModelReadyResponse),
    ("ModelReady", service_pb2.ModelReadyRequest(name="nope"), service_pb2.ModelReadyResponse),
    ("ServerMetadata", service_pb2.ServerMetadataRequest(), service_pb2.ServerMetadataResponse),
    ("ModelMetadata", service_pb2.ModelMetadataRequest(name="add_sub"), service_pb2.ModelMetadataResponse),
    ("ModelMetadata", service_pb2.ModelMetadataRequest(name="nope"), service_pb2.ModelMetadataResponse),
    ("ModelConfig", service_pb2.ModelConfigRequest(name="classifier"), service_pb2.ModelConfigResponse),
    ("RepositoryIndex", service_pb2.RepositoryIndexRequest(), service_pb2.RepositoryIndexResponse),
    (
        "RepositoryModelLoad",
        service_pb2.RepositoryModelLoadRequest(model_name="add_sub"),
        service_pb2.RepositoryModelLoadResponse,
    ),
    ("ModelStatistics", service_pb2.ModelStatisticsRequest(name="nope"), service_pb2.ModelStatisticsResponse),
    (
        "SystemSharedMemoryStatus",
        service_pb2.SystemSharedMemoryStatusRequest(),
        service_pb2.SystemSharedMemoryStatusResponse,
    ),
    (
        "SystemSharedMemoryRegister",
        service_pb2.SystemSharedMemoryRegisterRequest(name="r", key="/no_such_segment_here", byte_size=16),
        service_pb2.SystemSharedMemoryRegisterResponse,
    ),
    ("LogSettings", service_pb2.LogSettingsRequest(), service_pb2.LogSettingsResponse),
]


@pytest.mark.parametrize(
    ("method", "request_", "response_type"),
    FORWARDED_GRPC,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(FORWARDED_GRPC)],
)
def test_forwarded_grpc_calls_answer_as_without_frontends(
    channels: dict[str, grpc.Channel], method: str, request_: Any, response_type: Any
) -> None:
    got = grpc_msg(channels["frontends"], method, request_, response_type)
    want = grpc_msg(channels["plain"], method, request_, response_type)
    assert got == want


def test_grpc_health_service_is_forwarded(channels: dict[str, grpc.Channel]) -> None:
    from shoal.proto.gen import health_pb2

    got = grpc_msg(channels["frontends"], HEALTH, health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse)
    want = grpc_msg(channels["plain"], HEALTH, health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse)
    assert got == want and got[0] == "OK"


def test_health_and_metadata_with_tritonclient(server: ServerProcess) -> None:
    hc, gc_ = hclient(server), gclient(server)
    assert hc.is_server_live() and hc.is_server_ready() and hc.is_model_ready("add_sub")
    assert gc_.is_server_live() and gc_.is_server_ready() and gc_.is_model_ready("add_sub")
    assert not hc.is_model_ready("nope") and not gc_.is_model_ready("nope")
    assert hc.get_model_metadata("add_sub")["name"] == "add_sub"
    assert gc_.get_model_metadata("add_sub").name == "add_sub"
    assert hc.get_model_config("add_sub")["name"] == "add_sub"
    index = {m["name"]: m["state"] for m in hc.get_model_repository_index()}
    assert index == {m: "READY" for m in MODELS}
    assert {m.name for m in gc_.get_model_repository_index().models} == set(MODELS)


def test_statistics_count_requests_made_through_frontends(server: ServerProcess) -> None:
    hc, gc_ = hclient(server), gclient(server)

    def counts() -> tuple[int, int]:
        (h,) = hc.get_inference_statistics("add_sub")["model_stats"]
        (g,) = gc_.get_inference_statistics("add_sub").model_stats
        assert int(h["inference_stats"]["success"]["count"]) == g.inference_stats.success.count
        assert int(h["inference_count"]) == g.inference_count
        return int(h["inference_stats"]["success"]["count"]), int(h["inference_count"])

    before = counts()
    a = np.ones(4, dtype=np.float32)
    for client, mod in ((hc, httpclient), (gc_, grpcclient)):
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = mod.InferInput(name, [4], "FP32")
            t.set_data_from_numpy(a)
            inputs.append(t)
        for _ in range(3):
            client.infer("add_sub", inputs)
    after = counts()
    assert after == (before[0] + 6, before[1] + 6)


# ---- streams and generate ----------------------------------------------------------------------------


def _stream_run(srv: ServerProcess) -> list[tuple[Any, ...]]:
    c = gclient(srv)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        x = grpcclient.InferInput("IN", [3], "INT32")
        x.set_data_from_numpy(np.array([7, 8, 9], dtype=np.int32))
        c.async_stream_infer("repeat", [x], request_id="s1", enable_empty_final_response=True)
        out: list[tuple[Any, ...]] = []
        for _ in range(4):
            result, error = got.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            vals = (int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])) if resp.outputs else ()
            out.append((resp.id, resp.model_name, final, vals))
        y = grpcclient.InferInput("IN", [1], "INT32")
        y.set_data_from_numpy(np.array([1], dtype=np.int32))
        c.async_stream_infer("nope", [y], request_id="s2")
        _, error = got.get(timeout=30)
        out.append(("error", str(error)))
        return out
    finally:
        c.stop_stream()


def test_model_stream_infer_answers_as_without_frontends(server: ServerProcess, plain: ServerProcess) -> None:
    got = _stream_run(server)
    assert got == _stream_run(plain)
    assert got[:4] == [
        ("s1", "repeat", False, (7, 0)),
        ("s1", "repeat", False, (8, 1)),
        ("s1", "repeat", False, (9, 2)),
        ("s1", "repeat", True, ()),
    ]
    assert "nope" in got[4][1]


STREAM = SERVICE + "ModelStreamInfer"


def stream_raw(
    channel: grpc.Channel, messages: list[bytes], metadata: Any = None, timeout_s: float = 60
) -> tuple[str, list[bytes] | str]:
    """``("OK", every response message)`` of a stream that sends ``messages`` (raw bytes) and
    ends, or ``(code name, details)``."""
    call: Any = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
    try:
        return "OK", list(call(iter(messages), metadata=metadata, timeout=timeout_s))
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def by_request(answer: tuple[str, list[bytes] | str]) -> dict[str, list[bytes]]:
    """A stream's response messages by request id, each request's in order (requests of one
    stream may be answered in any order)."""
    code, out = answer
    assert code == "OK", out
    assert isinstance(out, list)
    got: dict[str, list[bytes]] = {}
    for raw in out:
        got.setdefault(service_pb2.ModelStreamInferResponse.FromString(raw).infer_response.id, []).append(raw)
    return got


def repeat_request(
    request_id: str, values: list[int], empty_final: bool | None = None, **params: Any
) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="repeat", id=request_id)
    req.inputs.add(name="IN", datatype="INT32", shape=[len(values)]).contents.int_contents.extend(values)
    if empty_final is not None:
        req.parameters["triton_enable_empty_final_response"].bool_param = empty_final
    for k, v in params.items():
        if isinstance(v, str):
            req.parameters[k].string_param = v
        else:
            req.parameters[k].int64_param = v
    return req


def _stream_cases() -> list[bytes]:
    """Requests of every kind for one stream, each with its own id (a malformed message has
    none): a decoupled model's 0, 1 and many responses (more than the flow-control windows),
    from a thread or from execute, an error after two, the empty final response or not;
    models that are not decoupled (the ``ModelInfer`` cases); failures of every kind."""
    reqs: list[service_pb2.ModelInferRequest] = []
    for mode in ("thread", "execute"):
        for values in ([], [5], list(range(150))):
            for empty in (None, False, True):
                reqs.append(repeat_request(f"r-{mode}-{len(values)}-{empty}", values, empty, mode=mode))
    reqs.append(repeat_request("r-error", [1, 2, 3, 4], True, mode="error_after_two"))
    reqs.append(repeat_request("r-error-noempty", [1, 2, 3, 4], mode="error_after_two"))
    reqs.append(repeat_request("r-delayed", [1, 2], True, delay_ms=50))
    for k, (_, case) in enumerate(GRPC_INFER_CASES):
        req = service_pb2.ModelInferRequest()
        req.CopyFrom(case)
        req.id = f"infer-{k}"
        reqs.append(req)
        if k == 0:  # the empty final response's parameter means nothing to a model that is not decoupled
            also = service_pb2.ModelInferRequest()
            also.CopyFrom(req)
            also.id = "infer-empty-final"
            also.parameters["triton_enable_empty_final_response"].bool_param = True
            reqs.append(also)
    one = service_pb2.ModelInferRequest(model_name="identity_fp32", id="identity")
    one.inputs.add(name="INPUT0", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2, 3])
    reqs.append(one)
    for model, version, rid in (("nope", "", "e-unknown"), ("add_sub", "7", "e-version"), ("add_sub", "x", "e-nan")):
        bad = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=rid)
        bad.inputs.add(name="INPUT0", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
        reqs.append(bad)
    missing = service_pb2.ModelInferRequest(model_name="add_sub", id="e-missing")
    missing.inputs.add(name="INPUT0", datatype="FP32", shape=[4]).contents.fp32_contents.extend(A)
    reqs.append(missing)
    wrong = service_pb2.ModelInferRequest(model_name="repeat", id="e-datatype")
    wrong.inputs.add(name="IN", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    reqs.append(wrong)
    mismatch = service_pb2.ModelInferRequest(model_name="repeat", id="e-contents")
    mismatch.inputs.add(name="IN", datatype="INT32", shape=[3]).contents.int_contents.append(1)
    reqs.append(mismatch)
    return [r.SerializeToString() for r in reqs] + [b"\xff\xff not a message"]


STREAM_CASES = _stream_cases()


def test_stream_messages_as_without_frontends(channels: dict[str, grpc.Channel]) -> None:
    """Every response message of a stream mixing decoupled and other models, successes and
    failures, is the one the router alone sends, byte for byte."""
    got = by_request(stream_raw(channels["frontends"], STREAM_CASES))
    want = by_request(stream_raw(channels["plain"], STREAM_CASES))
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid] == want[rid], rid
    final = "triton_final_response"
    msgs = {rid: [service_pb2.ModelStreamInferResponse.FromString(m) for m in ms] for rid, ms in got.items()}
    assert "r-thread-0-None" not in msgs and "r-execute-0-False" not in msgs  # no empty final response
    (empty,) = msgs["r-thread-0-True"]
    assert empty.infer_response.parameters[final].bool_param and not empty.infer_response.outputs
    many = msgs["r-thread-150-None"]
    assert len(many) == 150 and [m.infer_response.parameters[final].bool_param for m in many] == [False] * 150
    assert len(msgs["r-thread-150-True"]) == 151 and len(msgs["r-execute-150-None"]) == 150
    assert msgs["r-execute-150-None"][-1].infer_response.parameters[final].bool_param
    error = msgs["r-error"]
    assert len(error) == 3 and error[2].error_message == "failed at element 2"
    assert [m.error_message != "" for m in msgs["e-unknown"]] == [True]
    assert msgs[""][0].error_message == "failed to parse the request message"
    assert len(msgs["infer-0"]) == 1 and msgs["infer-0"][0].infer_response.parameters[final].bool_param


def test_stream_requests_one_by_one_as_without_frontends(channels: dict[str, grpc.Channel]) -> None:
    """Each request alone on a stream: the same messages, in the same order."""
    for raw in STREAM_CASES[::3]:
        assert stream_raw(channels["frontends"], [raw]) == stream_raw(channels["plain"], [raw])


def test_stream_with_tritonclient_many_requests(server: ServerProcess) -> None:
    """Many requests in flight on one stream (decoupled and not): every response arrives,
    each request's in order."""
    c = gclient(server)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        x = grpcclient.InferInput("IN", [100], "INT32")
        x.set_data_from_numpy(np.arange(100, dtype=np.int32))
        y = grpcclient.InferInput("INPUT0", [2], "FP32")
        y.set_data_from_numpy(np.array([1.5, 2.5], dtype=np.float32))
        for k in range(20):
            c.async_stream_infer("repeat", [x], request_id=f"r{k}", enable_empty_final_response=True)
            c.async_stream_infer("identity_fp32", [y], request_id=f"i{k}")
        seen: dict[str, list[int]] = {}
        finals = 0
        while finals < 40:
            result, error = got.get(timeout=60)
            assert error is None, error
            resp = result.get_response()
            if resp.parameters["triton_final_response"].bool_param:
                finals += 1
            if resp.model_name == "repeat" and resp.outputs:
                seen.setdefault(resp.id, []).append(int(result.as_numpy("IDX")[0]))
            elif resp.model_name == "identity_fp32":
                assert result.as_numpy("OUTPUT0").tolist() == [1.5, 2.5]
                seen.setdefault(resp.id, [])
        assert len(seen) == 40 and all(seen[f"r{k}"] == list(range(100)) for k in range(20))
    finally:
        c.stop_stream()


def _unix_connections(path: str) -> int:
    """Connections accepted on the Unix socket ``path`` and still open."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[5:6] == ["03"] and line.endswith(" " + path))


def _run_dir(srv: ServerProcess) -> str:
    cmd = _cmdline(frontend_pids(srv)[0])
    return cmd[cmd.index("--run-dir") + 1]


def test_cancelled_stream_reaches_the_models(server: ServerProcess, tmp_path: Path) -> None:
    """A client that cancels its stream: its requests in flight are cancelled at the router,
    the models see it (a decoupled one stops sending, another stops early), and nothing of
    them is left (outstanding requests, arenas: the next requests are served)."""
    before = server.log.count("repeat stopped: cancelled")
    marker = tmp_path / "marker"
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got: list[Any] = []
    c.start_stream(callback=lambda result, error: got.append(result))
    x = grpcclient.InferInput("IN", [500], "INT32")
    x.set_data_from_numpy(np.arange(500, dtype=np.int32))
    c.async_stream_infer("repeat", [x], parameters={"mode": "slow"})
    y = grpcclient.InferInput("INPUT0", [1], "FP32")
    y.set_data_from_numpy(np.ones(1, np.float32))
    c.async_stream_infer("cancellable", [y], parameters={"marker": str(marker)})
    big = grpcclient.InferInput("INPUT0", [1 << 18], "FP32")  # 1 MiB: in the frontend's arena
    big.set_data_from_numpy(np.ones(1 << 18, np.float32))
    c.async_stream_infer("slow", [big], parameters={"delay_ms": 3000})
    wait_until(lambda: len(got) >= 2, timeout_s=10)
    c.stop_stream(cancel_requests=True)
    c.close()
    wait_until(lambda: server.log.count("repeat stopped: cancelled") > before, timeout_s=5)
    wait_until(lambda: marker.exists() and marker.read_text() != "", timeout_s=5)
    assert float(marker.read_text()) < 5.0
    assert len(got) < 100
    for model in ("repeat", "cancellable", "slow"):
        wait_until(lambda m=model: _outstanding(server, m) == 0, timeout_s=30)  # type: ignore[misc]
    assert _stream_run(server)[0] == ("s1", "repeat", False, (7, 0))


def test_streams_give_arena_blocks_back(server: ServerProcess) -> None:
    """1 MiB inputs and outputs on streams, answered and abandoned mid-stream, far more than
    the arenas hold (``SMALL_ARENAS``): none is kept, so the last requests are served."""
    n = 1 << 18
    big = np.arange(n, dtype=np.float32).tobytes()
    req = service_pb2.ModelInferRequest(model_name="identity_fp32", id="big")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[n])
    req.raw_input_contents.append(big)
    raw = req.SerializeToString()
    with _channel(server) as channel:

        def answered(count: int) -> None:
            msgs = by_request(stream_raw(channel, [raw] * count))["big"]
            assert len(msgs) == count
            for m in msgs:
                resp = service_pb2.ModelStreamInferResponse.FromString(m)
                assert not resp.error_message, resp.error_message
                assert resp.infer_response.raw_output_contents[0] == big

        answered(80)
        call: Any = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        for k in range(20):
            responses = call(iter([raw] * 8), timeout=60)
            if k % 2:
                next(responses)
            responses.cancel()
        wait_until(lambda: _outstanding(server, "identity_fp32") == 0, timeout_s=30)
        answered(80)


def test_stream_limits_as_without_frontends(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """``--grpc-restricted-protocol``, ``--grpc-header-forward-pattern``,
    ``--max-buffered-request-bytes`` and ``--grpc-stream-max-pending`` apply to a stream
    served by the frontend processes as to the router's own; and such streams never reach
    the router's gRPC server."""
    repo = make_repository(tmp_path / "repo", "identity_fp32", "repeat")
    (repo / "params" / "1").mkdir(parents=True)
    (repo / "params" / "1" / "model.py").write_text(PARAMS_MODEL)
    (repo / "params" / "config.pbtxt").write_text(PARAMS_CONFIG)
    args = (
        "--grpc-restricted-protocol",
        "inference:k=v",
        "--grpc-header-forward-pattern",
        "tenant",
        "--max-buffered-request-bytes",
        str(1 << 20),
        "--grpc-stream-max-pending",
        "4",
    )
    mine = ServerProcess(repo, *FRONTENDS, *args)
    fresh_server.append(mine)
    mine.start()
    theirs = ServerProcess(repo, *args)
    fresh_server.append(theirs)
    theirs.start()
    router_grpc = os.path.join(_run_dir(mine), "grpc.sock")
    allowed = (("triton-grpc-protocol-k", "v"), ("my-tenant", "blue"), ("x-other", "no"))
    params = service_pb2.ModelInferRequest(model_name="params", id="p")
    params.inputs.add(name="IN", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    small = repeat_request("small", [1, 2, 3], True)
    over = service_pb2.ModelInferRequest(model_name="identity_fp32", id="over")
    over.inputs.add(name="INPUT0", datatype="FP32", shape=[1 << 18])
    over.raw_input_contents.append(bytes(2 << 20))  # 2 MiB: over the budget
    cases = [params.SerializeToString(), small.SerializeToString()]
    with _channel(mine) as a, _channel(theirs) as b:
        refused = stream_raw(a, cases)
        assert refused == stream_raw(b, cases) and refused[0] == "UNAVAILABLE", refused
        got = by_request(stream_raw(a, cases, metadata=allowed))
        assert got == by_request(stream_raw(b, cases, metadata=allowed))
        out = service_pb2.ModelStreamInferResponse.FromString(got["p"][0]).infer_response.raw_output_contents[0]
        assert json.loads(out[4:]) == {"my-tenant": "blue"}
        assert len(got["small"]) == 4
        # alone (the error names the bytes other requests hold)
        got = by_request(stream_raw(a, [over.SerializeToString()], metadata=allowed))
        assert got == by_request(stream_raw(b, [over.SerializeToString()], metadata=allowed))
        error = service_pb2.ModelStreamInferResponse.FromString(got["over"][0]).error_message
        assert "--max-buffered-request-bytes" in error

        def unread_stream(channel: grpc.Channel) -> int:
            """Requests a client that never reads gets to send (the server stops reading them)."""
            sent = 0
            stop = threading.Event()
            payload = bytes(64 << 10)

            def requests_() -> Iterator[bytes]:
                nonlocal sent
                while not stop.is_set() and sent < cap:
                    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
                    req.inputs.add(name="INPUT0", datatype="FP32", shape=[len(payload) // 4])
                    req.raw_input_contents.append(payload)
                    sent += 1
                    yield req.SerializeToString()

            call: Any = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
            responses = call(requests_(), metadata=allowed, timeout=60)
            try:
                time.sleep(3)
                stalled = sent
                time.sleep(1.5)
                assert sent == stalled, "the server kept reading a stream whose client reads nothing"
                return sent
            finally:
                stop.set()
                responses.cancel()

        # with the frontends and without: the count steady (checked inside) and short of the
        # cap, which a server that kept reading would take all of (gRPC's own buffering and
        # the 4 pending stay below it: ``unread_stream_cap``)
        cap = unread_stream_cap(64 << 10, 4)
        assert unread_stream(a) < cap and unread_stream(b) < cap, cap
    assert _unix_connections(router_grpc) == 0, "a stream went through the router's gRPC server"
    assert mine.terminate() == 0 and theirs.terminate() == 0


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


def test_slow_stream_reader_stops_the_model(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """As tests/e2e/test_stream_flow.py through a frontend process: a client that stops
    reading stops the model's response sender (the frontend takes no more of the router's
    replies, the router no more of the model's responses), so neither process grows; once the
    client reads again every response arrives, in order."""
    model = tmp_path / "repo" / "flood"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(FLOOD_MODEL)
    (model / "config.pbtxt").write_text(FLOOD_CONFIG)
    srv = ServerProcess(tmp_path / "repo", "--frontend-processes", "1")
    fresh_server.append(srv)
    srv.start()
    (frontend,) = frontend_pids(srv)
    rss = {p: _vm_rss(p) for p in (srv.pid, frontend)}

    def sent() -> int:
        try:
            return int((model / "1" / "sent").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    with grpc.insecure_channel(srv.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="flood")
        req.inputs.add(name="IN", datatype="INT32", shape=[1]).contents.int_contents.append(1)
        responses = stub.ModelStreamInfer(iter([req]))
        first = next(responses)
        assert not first.error_message, first.error_message
        before, deadline = -1, time.monotonic() + 15
        while time.monotonic() < deadline:  # the model stops advancing: its sender waits
            time.sleep(1.0)
            if sent() == before:
                break
            before = sent()
        stuck = sent()
        assert 0 < stuck < FLOOD_N // 2, f"the model sent {stuck} of {FLOOD_N} responses to a client that reads nothing"
        for p, was in rss.items():
            assert _vm_rss(p) < was + (64 << 20), f"process {p} grew by {(_vm_rss(p) - was) >> 20} MiB"
        got = [int(np.frombuffer(first.infer_response.raw_output_contents[0], dtype=np.int32)[0])]
        for r in responses:
            assert not r.error_message, r.error_message
            if r.infer_response.raw_output_contents:
                got.append(int(np.frombuffer(r.infer_response.raw_output_contents[0], dtype=np.int32)[0]))
            if r.infer_response.parameters["triton_final_response"].bool_param:
                break
        assert got == list(range(FLOOD_N))
    assert srv.terminate() == 0, srv.log


def _events(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return [json.loads(b[len("data: ") :]) for b in resp.text.split("\n\n") if b.strip()]


def test_generate_and_generate_stream(server: ServerProcess) -> None:
    url = f"http://{server.url}/v2/models"
    r = requests.post(f"{url}/tokens/generate_stream", json={"text_input": "the quick brown fox"}, timeout=30)
    assert r.status_code == 200
    events = _events(r)
    assert [e["text_output"] for e in events] == ["the", "quick", "brown", "fox"]
    assert [e["index"] for e in events] == [0, 1, 2, 3]
    body: dict[str, Any] = {"text_input": "one two three four", "parameters": {"fail_after": 2}}
    events = _events(requests.post(f"{url}/tokens/generate_stream", json=body, timeout=30))
    assert [e.get("text_output") for e in events] == ["one", "two", None] and events[2] == {"error": "tokenizer broke"}
    r = requests.post(f"{url}/tokens/generate", json={"text_input": "single"}, timeout=30)
    assert r.status_code == 200 and r.json()["text_output"] == "single"
    r = requests.post(f"{url}/tokens/generate", json={"text_input": "two words"}, timeout=30)
    assert r.status_code == 400 and "more than one response" in r.json()["error"]
    r = requests.post(f"{url}/nope/generate", data=b'{"text_input": "x"}', timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "Request for unknown model: 'nope' is not found"


def test_generate_stream_client_that_leaves(server: ServerProcess) -> None:
    """A client that drops a forwarded stream midway: the next requests are served."""

    async def main() -> tuple[list[str], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            words = " ".join(f"w{i}" for i in range(50))
            url = f"http://{server.url}/v2/models/tokens"
            async with session.post(f"{url}/generate_stream", json={"text_input": words}) as resp:
                got = []
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        got.append(json.loads(line[6:])["text_output"])
                    if len(got) == 3:
                        break
            async with session.post(f"{url}/generate", json={"text_input": "after"}) as resp:
                return got, await resp.json()

    got, after = asyncio.run(main())
    assert got == ["w0", "w1", "w2"] and after["text_output"] == "after"


# ---- system shared memory ------------------------------------------------------------------------------


def _add_sub_shm(mod: Any, in_region: str, out_region: str) -> tuple[list[Any], list[Any]]:
    i0 = mod.InferInput("INPUT0", [4], "FP32")
    i0.set_shared_memory(in_region, 16)
    i1 = mod.InferInput("INPUT1", [4], "FP32")
    i1.set_shared_memory(in_region, 16, offset=16)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory(out_region, 16)
    o1 = mod.InferRequestedOutput("OUTPUT1")
    o1.set_shared_memory(out_region, 16, offset=16)
    return [i0, i1], [o0, o1]


def _shm_scenario(srv: ServerProcess, label: str) -> list[Any]:
    """Register over HTTP and gRPC, infer with inputs and outputs in the regions over both
    (and across: a region registered over one protocol used over the other), a bad
    reference, unregister; what the client saw, for comparison."""
    hc, gc_ = hclient(srv), gclient(srv)
    handles: list[Any] = []
    seen: list[Any] = []
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 10, dtype=np.float32)
    try:
        for proto, client, mod in (("http", hc, httpclient), ("grpc", gc_, grpcclient)):
            names = {k: f"{k}_{proto}" for k in ("in", "out")}
            for name in names.values():
                h = shm.create_shared_memory_region(name, f"/{KEY_PREFIX}{label}_{name}", 32)
                handles.append(h)
                # a client's x-shoal-peer header must not be believed (the router would then
                # think the client remote and refuse the registration)
                client.register_system_shared_memory(
                    name, f"/{KEY_PREFIX}{label}_{name}", 32, headers={"x-shoal-peer": "10.1.2.3 4 5"}
                )
            h_in, h_out = handles[-2], handles[-1]
            shm.set_shared_memory_region(h_in, [a, b])
            inputs, outputs = _add_sub_shm(mod, names["in"], names["out"])
            r = client.infer("add_sub", inputs, outputs=outputs, request_id=f"shm-{proto}")
            seen.append(r.get_response())
            np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4]), a + b)
            np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4], offset=16), a - b)
            shm.set_shared_memory_region(h_out, [np.zeros(8, np.float32)])
            if proto == "grpc":  # the same on a stream
                streamed: queue.Queue[tuple[Any, Any]] = queue.Queue()
                gc_.start_stream(callback=lambda result, error, q=streamed: q.put((result, error)))
                try:
                    gc_.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="shm-stream")
                    result, error = streamed.get(timeout=30)
                finally:
                    gc_.stop_stream()
                assert error is None, error
                seen.append(result.get_response())
                np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4]), a + b)
                np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4], offset=16), a - b)
                shm.set_shared_memory_region(h_out, [np.zeros(8, np.float32)])
        # across: HTTP's regions used over gRPC and gRPC's over HTTP
        for client, mod, proto in ((gc_, grpcclient, "http"), (hc, httpclient, "grpc")):
            shm.set_shared_memory_region(handles[0 if proto == "http" else 2], [a * 2, b])
            inputs, outputs = _add_sub_shm(mod, f"in_{proto}", f"out_{proto}")
            client.infer("add_sub", inputs, outputs=outputs)
            out = handles[1 if proto == "http" else 3]
            np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, [4]), a * 2 + b)
        seen.append(sorted(s["name"] for s in hc.get_system_shared_memory_status()))
        seen.append(sorted(s.name for s in gc_.get_system_shared_memory_status().regions.values()))
        # past the end of a region, and a region that is not there
        for client, mod in ((hc, httpclient), (gc_, grpcclient)):
            inputs, outputs = _add_sub_shm(mod, "in_http", "out_http")
            outputs[1].set_shared_memory("out_http", 16, offset=24)
            with pytest.raises(InferenceServerException) as err:
                client.infer("add_sub", inputs, outputs=outputs)
            seen.append((err.value.status(), err.value.message()))
            inputs, outputs = _add_sub_shm(mod, "no_such_region", "out_http")
            with pytest.raises(InferenceServerException) as err:
                client.infer("add_sub", inputs, outputs=outputs)
            seen.append((err.value.status(), err.value.message()))
        hc.unregister_system_shared_memory("in_http")
        gc_.unregister_system_shared_memory("in_grpc")
        seen.append(sorted(s["name"] for s in hc.get_system_shared_memory_status()))
        hc.unregister_system_shared_memory()
        gc_.unregister_system_shared_memory()
        seen.append(hc.get_system_shared_memory_status())
        seen.append(len(gc_.get_system_shared_memory_status().regions))
        return seen
    finally:
        try:
            hc.unregister_system_shared_memory()
        finally:
            for h in handles:
                shm.destroy_shared_memory_region(h)


def test_system_shared_memory(server: ServerProcess, plain: ServerProcess) -> None:
    got = _shm_scenario(server, "f")
    want = _shm_scenario(plain, "p")
    assert got == want
    # the response names the outputs but carries none of their bytes
    http_resp, grpc_resp, stream_resp = got[0], got[1], got[2]
    assert http_resp["id"] == "shm-http" and [o["name"] for o in http_resp["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert all("data" not in o and "binary_data_size" not in o.get("parameters", {}) for o in http_resp["outputs"])
    assert grpc_resp.id == "shm-grpc" and all(len(c) == 0 for c in grpc_resp.raw_output_contents)
    assert stream_resp.id == "shm-stream" and all(len(c) == 0 for c in stream_resp.raw_output_contents)
    assert got[3] == got[4] == ["in_grpc", "in_http", "out_grpc", "out_http"]
    assert got[-3] == ["out_grpc", "out_http"] and got[-2] == [] and got[-1] == 0


# ---- tracing ---------------------------------------------------------------------------------------------


def _trace_of(path: Path, request_id: str) -> list[str]:
    """The timestamp names of the trace of the request ``request_id`` (waited for)."""
    found: list[list[str]] = []

    def look() -> bool:
        objects = _traces(path)
        ids = [o["id"] for o in objects if o.get("request_id") == request_id and "model_name" in o]
        if len(ids) != 1:
            return False
        stamps = [o["timestamps"][0]["name"] for o in objects if o["id"] == ids[0] and "timestamps" in o]
        if not stamps or stamps[-1] not in ("HTTP_SEND_END", "GRPC_SEND_END"):
            return False
        found.append(stamps)
        return True

    wait_until(look, timeout_s=20)
    return found[-1]


def test_traced_requests_go_through_the_router(server: ServerProcess, plain: ServerProcess, trace_file: Path) -> None:
    hc, gc_ = hclient(server), gclient(server)
    a = np.arange(4, dtype=np.float32)

    def infer(client: Any, mod: Any, request_id: str) -> Any:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = mod.InferInput(name, [4], "FP32")
            t.set_data_from_numpy(a)
            inputs.append(t)
        return client.infer("add_sub", inputs, request_id=request_id).as_numpy("OUTPUT0")

    # tracing is off: nothing is written
    np.testing.assert_array_equal(infer(hc, httpclient, "untraced-1"), a + a)
    hc.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    try:
        assert gc_.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        for k in range(3):  # several, so that both frontend processes see some
            np.testing.assert_array_equal(infer(hc, httpclient, f"fp-http-{k}"), a + a)
            np.testing.assert_array_equal(infer(gc_, grpcclient, f"fp-grpc-{k}"), a + a)
        for k in range(3):
            assert _trace_of(trace_file, f"fp-http-{k}") == STAMPS_HTTP
            assert _trace_of(trace_file, f"fp-grpc-{k}") == STAMPS_GRPC
        # errors of requests that go through the router are the same errors
        decoupled = infer_json({"name": "IN", "datatype": "INT32", "shape": [1], "data": [1]})
        for path, body in (("/v2/models/nope/infer", ADD_SUB), ("/v2/models/repeat/infer", decoupled)):
            assert comparable(http_call(server, "POST", path, body)) == comparable(http_call(plain, "POST", path, body))
        with _channel(server) as mine, _channel(plain) as theirs:
            for model, inputs in (("nope", [("INPUT0", [1.0])]), ("repeat", [("IN", [1])])):
                req = service_pb2.ModelInferRequest(model_name=model)
                for name, values in inputs:
                    t = req.inputs.add(name=name, datatype="FP32" if model == "nope" else "INT32", shape=[1])
                    if model == "nope":
                        t.contents.fp32_contents.extend(values)
                    else:
                        t.contents.int_contents.extend(values)
                raw = req.SerializeToString()
                got = grpc_raw(mine, SERVICE + "ModelInfer", raw)
                assert got == grpc_raw(theirs, SERVICE + "ModelInfer", raw) and got[0] != "OK"
    finally:
        hc.update_trace_settings(settings=CLEAR)
    assert hc.get_trace_settings()["trace_level"] == ["OFF"]
    # requests are served (by the frontends again, once they try) with tracing off
    for k in range(3):
        np.testing.assert_array_equal(infer(hc, httpclient, f"after-{k}"), a + a)
        np.testing.assert_array_equal(infer(gc_, grpcclient, f"gafter-{k}"), a + a)
    assert not [o for o in _traces(trace_file) if o.get("request_id") == "untraced-1"]


def _stream_trace_of(path: Path, request_id: str) -> list[str]:
    """The timestamp names of the trace of the streamed request ``request_id`` (waited for:
    its last is GRPC_SEND_START)."""
    found: list[list[str]] = []

    def look() -> bool:
        objects = _traces(path)
        ids = [o["id"] for o in objects if o.get("request_id") == request_id and "model_name" in o]
        if len(ids) != 1:
            return False
        stamps = [o["timestamps"][0]["name"] for o in objects if o["id"] == ids[0] and "timestamps" in o]
        if "GRPC_SEND_START" not in stamps:
            return False
        found.append(stamps)
        return True

    wait_until(look, timeout_s=20)
    return found[-1]


def test_traced_streamed_requests_go_through_the_router(
    server: ServerProcess, plain: ServerProcess, trace_file: Path
) -> None:
    """While tracing is on, each request of a stream goes to the router on a stream of its
    own (which traces it) and its responses are relayed into the client's stream; requests
    of the same stream before and after are served by the frontend process. The messages are
    the router's own either way."""
    add = service_pb2.ModelInferRequest(model_name="add_sub")
    add.inputs.add(name="INPUT0", datatype="FP32", shape=[4]).contents.fp32_contents.extend(A)
    add.inputs.add(name="INPUT1", datatype="FP32", shape=[4]).contents.fp32_contents.extend(B)

    def requests_(tag: str) -> list[service_pb2.ModelInferRequest]:
        a = service_pb2.ModelInferRequest()
        a.CopyFrom(add)
        a.id = f"{tag}-add"
        bad = service_pb2.ModelInferRequest(model_name="nope", id=f"{tag}-nope")
        return [
            repeat_request(f"{tag}-repeat", [4, 5, 6], True),
            a,
            repeat_request(f"{tag}-none", []),
            repeat_request(f"{tag}-many", list(range(100)), mode="execute"),
            bad,
        ]

    tags = ("before", "traced", "after")
    with _channel(plain) as ref:
        want = by_request(stream_raw(ref, [r.SerializeToString() for t in tags for r in requests_(t)]))
    hc = hclient(server)
    sent: queue.Queue[bytes | None] = queue.Queue()
    got: dict[str, list[bytes]] = {}
    with _channel(server) as channel:
        call: Any = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        responses = call(iter(sent.get, None), timeout=120)

        def exchange(tag: str) -> None:
            reqs = requests_(tag)
            for r in reqs:
                sent.put(r.SerializeToString())
            finals = 0
            while finals < len(reqs) - 1:  # "-none" sends nothing
                raw = next(responses)
                msg = service_pb2.ModelStreamInferResponse.FromString(raw)
                got.setdefault(msg.infer_response.id, []).append(raw)
                finals += msg.infer_response.parameters["triton_final_response"].bool_param

        exchange("before")
        hc.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        try:
            exchange("traced")
        finally:
            hc.update_trace_settings(settings=CLEAR)
        exchange("after")
        sent.put(None)
        assert list(responses) == []
    assert got == want
    stamps = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *STAMPS_HTTP[2:-3], "GRPC_SEND_START"]
    for rid in ("traced-repeat", "traced-add", "traced-none", "traced-many"):
        # a decoupled request's final response may go out (GRPC_SEND_START) before its
        # execution has ended (COMPUTE_*, REQUEST_END): the set of stamps is what is fixed
        assert sorted(_stream_trace_of(trace_file, rid)) == sorted(stamps), rid
    traced = {o.get("request_id") for o in _traces(trace_file)}
    assert not traced & {f"{t}-{k}" for t in ("before", "after") for k in ("repeat", "add", "none", "many")}


@pytest.fixture(scope="module")
def gz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own for a bug that may leave a frontend's connection to the router
    in a bad state."""
    trace = tmp_path_factory.mktemp("gztrace") / "trace.json"
    repo = make_repository(tmp_path_factory.mktemp("gzrepo"), "identity_fp32")
    srv = ServerProcess(repo, "--frontend-processes", "1", "--trace-config", f"triton,file={trace}").start()
    yield srv
    srv.kill()


@pytest.mark.parametrize("why", ["raw binary body", "traced"])
def test_compressed_body_of_an_infer_sent_through_the_router(gz_server: ServerProcess, why: str) -> None:
    zeros = np.zeros(4096, np.float32)
    if why == "raw binary body":
        body, headers = zeros.tobytes(), {"Inference-Header-Content-Length": "0"}
    else:
        body, headers = infer_json(fp32("INPUT0", zeros.tolist())), {}
        status, _, data = http_call(
            gz_server,
            "POST",
            "/v2/trace/setting",
            json.dumps({"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}).encode(),
        )
        assert status == 200, data
    try:
        status, _, data = http_call(
            gz_server,
            "POST",
            "/v2/models/identity_fp32/infer",
            gzip.compress(body),
            {**headers, "Content-Encoding": "gzip"},
            timeout_s=10,
        )
    finally:
        http_call(gz_server, "POST", "/v2/trace/setting", json.dumps({"trace_level": None}).encode())
    assert status == 200, data


# ---- a frontend process that dies --------------------------------------------------------------------------


def _serves(srv: ServerProcess) -> bool:
    """A new HTTP connection and a new gRPC channel each get an inference answered."""
    try:
        status, _, data = http_call(srv, "POST", "/v2/models/add_sub/infer", ADD_SUB)
        if status != 200 or json.loads(data)["outputs"][0]["data"] != [1.5, 2.5, 2.0, 14.0]:
            return False
        req = service_pb2.ModelInferRequest(model_name="identity_fp32")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1]).contents.fp32_contents.append(3.0)
        with grpc.insecure_channel(srv.grpc_url) as ch:
            code, resp = grpc_msg(ch, "ModelInfer", req, service_pb2.ModelInferResponse)
        return code == "OK" and np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [3.0]
    except OSError:
        return False


def _frontend_of(srv: ServerProcess, conn: http.client.HTTPConnection) -> int:
    """The frontend process that accepted ``conn`` (which has been answered once): the one
    holding the server's end of the connection (``/proc/net/tcp``'s inode)."""
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    inode = ""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1].endswith(f":{srv.port:04X}") and cols[2].endswith(f":{client_port:04X}"):
                inode = cols[9]
    assert inode and inode != "0"
    for pid in frontend_pids(srv):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no frontend process holds the connection from port {client_port}")


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body)
    resp = conn.getresponse()
    return resp.status, resp.read()


def _connections_to_each(srv: ServerProcess, tries: int = 64) -> dict[int, http.client.HTTPConnection]:
    """A kept-alive connection, answered once, to each frontend process (the kernel spreads
    new connections over them); fewer if some process does not accept any."""
    conns: dict[int, http.client.HTTPConnection] = {}
    want = len(frontend_pids(srv))
    for _ in range(tries):
        conn = http.client.HTTPConnection(srv.url, timeout=60)
        try:
            status, _ = _post(conn, "/v2/models/add_sub/infer", ADD_SUB)
        except OSError:
            conn.close()
            continue
        owner = _frontend_of(srv, conn) if status == 200 else 0
        if owner and owner not in conns:
            conns[owner] = conn
        else:
            conn.close()
        if len(conns) == want:
            break
    return conns


def _all_serve(srv: ServerProcess) -> bool:
    """Every current frontend process accepts and answers (so each has started)."""
    pids = frontend_pids(srv)
    conns = _connections_to_each(srv)
    for c in conns.values():
        c.close()
    return len(pids) == 2 and sorted(conns) == pids


def _arena_of(srv: ServerProcess, frontend_pid: int) -> list[str]:
    """The shared-memory segments of a frontend process's input arena."""
    rx = re.compile(rf"_fe\d+p{frontend_pid}_")
    return [n for n in srv.segments() if rx.search(n)]


def test_lane_requests_started_together_are_each_in_flight(server: ServerProcess) -> None:
    """Six requests sent over lanes within one statistics message of a frontend (their starts
    go to the router as one record with a count): the router counts six in flight while the
    workers hold them, none once they are answered, and six more successes."""

    def successes() -> int:
        _, _, data = http_call(server, "GET", "/v2/models/slow/stats")
        return int(json.loads(data)["model_stats"][0]["inference_stats"]["success"]["count"])

    before = successes()
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": A}], "parameters": {"delay_ms": 1500}}
    ).encode()
    answers: list[Any] = []
    threads = [
        threading.Thread(target=lambda: answers.append(http_call(server, "POST", "/v2/models/slow/infer", body)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: _outstanding(server, "slow") == 6, timeout_s=30)
    for t in threads:
        t.join(60)
    assert [a[0] for a in answers] == [200] * 6, answers
    wait_until(lambda: _outstanding(server, "slow") == 0, timeout_s=30)
    wait_until(lambda: successes() == before + 6, timeout_s=30)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)


def test_frontends_serve_grpc_on_its_older_listener(server: ServerProcess) -> None:
    """The frontend processes start with grpc's EventEngine listener turned off
    (``server/grpcenv.py``: one thread wake-up less per call), set by the router for its
    children; grpc knew the experiment (no "Unknown experiment" error in the log) and the
    frontends answer gRPC with it (every gRPC test of this module)."""
    if "GRPC_EXPERIMENTS" in os.environ:
        pytest.skip("GRPC_EXPERIMENTS is set for this test run: the server keeps it")
    for pid in frontend_pids(server):
        assert _environ(pid).get("GRPC_EXPERIMENTS") == "-event_engine_listener"
        assert _environ(pid).get("GRPC_ENABLE_FORK_SUPPORT") == "false"
    assert "Unknown experiment" not in server.log, server.log
    assert "gRPC runs with GRPC_EXPERIMENTS=-event_engine_listener" in server.log, server.log


def test_operators_grpc_experiments_are_kept(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """An operator's ``GRPC_EXPERIMENTS`` (here: empty, grpc's own defaults) reaches the
    frontend processes unchanged, and they serve gRPC with it."""
    srv = ServerProcess(make_repository(tmp_path / "repo", "add_sub"), *FRONTENDS, env={"GRPC_EXPERIMENTS": ""})
    fresh_server.append(srv)
    srv.start()
    pids = frontend_pids(srv)
    assert len(pids) == 2, srv.log
    for pid in pids:
        assert _environ(pid).get("GRPC_EXPERIMENTS") == ""
    assert "gRPC runs with" not in srv.log, srv.log
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
        inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("add_sub", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    finally:
        client.close()
    assert srv.terminate() == 0, srv.log


def test_killed_frontend_process_is_restarted(server: ServerProcess) -> None:
    """SIGKILL of a frontend process with a request in flight: its client loses the
    connection, the other process's clients go on, the router cancels the call, and a new
    process takes the dead one's place. Then the other one too: only new processes serve."""
    start = len(server.lines)
    before = frontend_pids(server)
    assert len(before) == 2
    workers = {m: server.worker_pids(m) for m in ("add_sub", "slow", "identity_fp32")}
    conns = _connections_to_each(server)
    try:
        assert sorted(conns) == before
        victim, survivor = before
        # 1 MiB in flight: its input is in the victim's own arena
        n = 1 << 18
        body, headers = binary_body(
            {
                "inputs": [
                    {"name": "INPUT0", "datatype": "FP32", "shape": [n], "parameters": {"binary_data_size": 4 * n}}
                ],
                "parameters": {"delay_ms": 1500},
            },
            np.zeros(n, np.float32).tobytes(),
        )
        conns[victim].request("POST", "/v2/models/slow/infer", body=body, headers=headers)
        wait_until(lambda: _outstanding(server, "slow") == 1, timeout_s=30)
        assert _arena_of(server, victim)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises((http.client.HTTPException, OSError)):
            conns[victim].getresponse().read()
        # the other process's client is served on its connection meanwhile
        status, data = _post(conns[survivor], "/v2/models/add_sub/infer", ADD_SUB)
        assert status == 200 and json.loads(data)["outputs"][0]["data"] == [1.5, 2.5, 2.0, 14.0]
        server.wait_log(rf"frontend process \d \(pid {victim}\) exited with code -9; restarting it", start=start)
        wait_until(lambda: victim not in frontend_pids(server) and _all_serve(server), timeout_s=30)
        wait_until(lambda: _outstanding(server, "slow") == 0, timeout_s=30)
        wait_until(lambda: not _arena_of(server, victim), timeout_s=30)  # removed by the router
        assert _post(conns[survivor], "/v2/models/add_sub/infer", ADD_SUB)[0] == 200
    finally:
        for conn in conns.values():
            conn.close()
    mark = len(server.lines)
    os.kill(survivor, signal.SIGKILL)
    server.wait_log(rf"frontend process \d \(pid {survivor}\) exited with code -9; restarting it", start=mark)
    wait_until(lambda: survivor not in frontend_pids(server) and _all_serve(server), timeout_s=30)
    assert not set(frontend_pids(server)) & set(before)
    for _ in range(4):
        assert _serves(server)
    # the router and its workers never noticed
    assert server.proc is not None and server.proc.poll() is None
    assert {m: server.worker_pids(m) for m in workers} == workers
    assert hclient(server).is_server_ready()
    assert "Traceback" not in "".join(server.lines[start:])


def _mapped_shm(pid: int) -> set[str]:
    """The /dev/shm objects process ``pid`` maps (unlinked ones end in " (deleted)")."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line}
    except (FileNotFoundError, IndexError):
        return set()


def test_frontends_unmap_the_arena_of_a_worker_that_exited(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """Frontend processes read large outputs in place in a worker's arena: when that worker
    dies, they unmap its segments (unlinked already) instead of keeping their memory."""
    srv = ServerProcess(make_repository(tmp_path / "repo", "identity_fp32"), *FRONTENDS)
    srv.start()
    fresh_server.append(srv)
    fes = frontend_pids(srv)
    own = re.compile(r"_fe\d+p\d+_")  # a frontend's own input arena
    n = 1 << 18  # 1 MiB out: in the worker's arena
    a = np.arange(n, dtype=np.float32)

    def worker_segments() -> set[str]:
        return {m for pid in fes for m in _mapped_shm(pid) if not own.search(m)}

    def serve_both() -> bool:  # new connections until both processes have answered one
        for _ in range(8):
            c = httpclient.InferenceServerClient(srv.url)
            try:
                i = httpclient.InferInput("INPUT0", [n], "FP32")
                i.set_data_from_numpy(a)
                np.testing.assert_array_equal(c.infer("identity_fp32", [i]).as_numpy("OUTPUT0"), a)
            finally:
                c.close()
        return bool(worker_segments())

    wait_until(serve_both, timeout_s=60)
    old = worker_segments()
    (worker,) = srv.worker_pids("identity_fp32")
    mark = len(srv.lines)
    os.kill(worker, signal.SIGKILL)
    srv.wait_log(r"model 'identity_fp32' version 1 instance '[^']+': ready \(pid \d+\)", start=mark)
    wait_until(lambda: not (worker_segments() & {m if m.endswith("(deleted)") else m + " (deleted)" for m in old}))
    assert not any(m.endswith("(deleted)") for m in worker_segments()), worker_segments()
    assert serve_both()  # the new worker's arena is mapped and read as before


def test_shutdown_while_a_frontend_process_restarts(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    srv = ServerProcess(make_repository(tmp_path / "repo", "identity_fp32"), *FRONTENDS, "--exit-timeout-secs", "3")
    srv.start()
    fresh_server.append(srv)
    pid = srv.pid
    before = frontend_pids(srv)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    new: list[int] = []
    while not new:  # polled tightly: the new process is stopped long before it can connect
        assert time.monotonic() < deadline, "no new frontend process"
        new = sorted(set(frontend_pids(srv)) - set(before))
        time.sleep(0.005)
    (replacement,) = new
    os.kill(replacement, signal.SIGSTOP)
    try:
        mark = len(srv.lines)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_log("received SIGTERM; shutting down", start=mark)
        time.sleep(0.2)  # the router has asked its processes to stop
    finally:
        os.kill(replacement, signal.SIGCONT)
    assert srv.terminate() == 0
    assert not frontends_alive(pid)
    assert "did not stop in time" not in srv.log, srv.log


# ---- shutdown, a router that dies, the command line ---------------------------------------------------------


def _outstanding(srv: ServerProcess, model: str) -> int:
    status, _, data = http_call(srv, "GET", "/v2/admin/workers")
    assert status == 200, data
    return sum(int(w["outstanding"]) for w in json.loads(data)["workers"] if w["model"] == model)


def test_sigterm_lets_inflight_requests_finish(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "slow")
    config = repo / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 2", "count: 3"))  # all three at once
    srv = ServerProcess(repo, *FRONTENDS).start()
    fresh_server.append(srv)
    pid = srv.pid
    assert len(frontend_pids(srv)) == 2
    time.sleep(0.5)  # the frontends have the router's lanes: HTTP and gRPC requests go there
    results: dict[str, Any] = {}

    def over_http() -> None:
        try:
            body = infer_json(fp32("INPUT0", A), parameters={"delay_ms": 1500})
            status, _, data = http_call(srv, "POST", "/v2/models/slow/infer", body)
            results["http"] = (status, json.loads(data))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results["http"] = exc

    def over_grpc() -> None:
        try:
            req = service_pb2.ModelInferRequest(model_name="slow", id="g")
            req.inputs.add(name="INPUT0", datatype="FP32", shape=[4]).contents.fp32_contents.extend(A)
            # longer than the request the router answers: the frontend's own (a lane's) still
            # runs when the router says that everything it accepted is answered
            req.parameters["delay_ms"].int64_param = 4000
            with grpc.insecure_channel(srv.grpc_url) as ch:
                results["grpc"] = grpc_msg(ch, "ModelInfer", req, service_pb2.ModelInferResponse)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results["grpc"] = exc

    def forwarded() -> None:  # generate: the router's own frontend answers it
        try:
            body = json.dumps({"INPUT0": A, "parameters": {"delay_ms": 1500}}).encode()
            status, _, data = http_call(srv, "POST", "/v2/models/slow/generate", body)
            results["forwarded"] = (status, json.loads(data))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results["forwarded"] = exc

    threads = [threading.Thread(target=f, daemon=True) for f in (over_http, over_grpc, forwarded)]
    for t in threads:
        t.start()
    wait_until(lambda: _outstanding(srv, "slow") == 3, timeout_s=30)  # all on the workers
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    status, doc = results["http"]
    assert status == 200 and doc["outputs"][0]["data"] == A, doc
    status, doc = results["forwarded"]
    assert status == 200 and doc["OUTPUT0"] == A, doc
    code, resp = results["grpc"]
    assert code == "OK", resp
    assert resp.id == "g" and np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == A
    assert srv.terminate() == 0, srv.log
    assert "server stopped" in srv.log
    assert not frontends_alive(pid)
    assert not srv.segments()
    assert "Traceback" not in srv.log, srv.log


def test_idle_grpc_stream_does_not_hold_shutdown(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """As tests/e2e/test_lifecycle.py's test of the same name (~1 s there without frontend
    processes): the bound is generous, far below the exit timeout."""
    srv = ServerProcess(make_repository(tmp_path / "repo", "identity_fp32"), *FRONTENDS, "--exit-timeout-secs", "6")
    srv.start()
    fresh_server.append(srv)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    got = threading.Event()
    client.start_stream(callback=lambda result, error: got.set())
    try:
        i = grpcclient.InferInput("INPUT0", [2], "FP32")
        i.set_data_from_numpy(np.ones(2, dtype=np.float32))
        client.async_stream_infer("identity_fp32", [i])
        assert got.wait(30)
        start = time.monotonic()
        assert srv.terminate() == 0
        assert time.monotonic() - start < 4, "shutdown waited for the idle stream"
    finally:
        client.stop_stream()
        client.close()


def test_router_killed_takes_its_frontends_along(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """SIGKILL of the router: its frontend processes see the worker channel close and exit,
    and the ports are free again."""
    srv = ServerProcess(make_repository(tmp_path / "repo", "identity_fp32"), *FRONTENDS).start()
    fresh_server.append(srv)
    pid, port, gport = srv.pid, srv.port, srv.grpc_port
    assert len(frontend_pids(srv)) == 2
    # some input in each frontend process's own arena first
    n = 1 << 18
    body, headers = binary_body(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n], "parameters": {"binary_data_size": 4 * n}}]},
        np.zeros(n, np.float32).tobytes(),
    )
    for _ in range(8):
        assert http_call(srv, "POST", "/v2/models/identity_fp32/infer", body, headers)[0] == 200
    fronts = frontend_pids(srv)
    assert [n for f in fronts for n in _arena_of(srv, f)]
    assert srv.proc is not None
    srv.proc.kill()
    srv.proc.wait(10)
    wait_until(lambda: not frontends_alive(pid), timeout_s=30)
    # each frontend process removed its own arena as it went
    left = [n for f in fronts for n in _arena_of(srv, f)]
    srv.kill()
    assert not left, left

    def free(p: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
        return True

    wait_until(lambda: free(port) and free(gport), timeout_s=30)


def _serve_cmd(repo: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shoal.server",
        "serve",
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        *extra,
    ]


def test_negative_frontend_processes_is_refused(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", "identity_fp32")
    proc = subprocess.run(
        _serve_cmd(repo, "--frontend-processes", "-1"), capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "--frontend-processes must be >= 0" in proc.stderr


def _error_lines(log: str) -> list[str]:
    return [line.split(" ERROR ", 1)[1] for line in log.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_port_in_use_is_reported_as_without_frontends(tmp_path: Path, which: str) -> None:
    repo = make_repository(tmp_path / "repo")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = (
            ["--http-port", str(port), "--grpc-port", "0"]
            if which == "http"
            else ["--http-port", "0", "--grpc-port", str(port)]
        )
        outcomes = []
        for extra in ((), FRONTENDS):
            proc = subprocess.run(
                _serve_cmd(repo, "--metrics-port", "0", *flags, *extra),
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            outcomes.append((proc.returncode, _error_lines(proc.stderr)))
    assert outcomes[0] == outcomes[1]
    what = "HTTP" if which == "http" else "gRPC"
    assert outcomes[0] == (1, [f"shoal: {what} port {port} is in use (--{which}-port)"])


def test_port_shared_with_another_reuseport_listener_is_refused(
    tmp_path: Path, fresh_server: list[ServerProcess]
) -> None:
    repo = make_repository(tmp_path / "repo")
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        outcomes = []
        for extra in ((), FRONTENDS):
            srv = ServerProcess(repo, "--http-port", str(port), *extra)
            fresh_server.append(srv)
            try:
                srv.start()
            except RuntimeError:
                pass  # it exited before it reported a port: the outcome says why
            assert srv.proc is not None
            try:
                rc: int | None = srv.proc.wait(30) if "server ready" not in srv.log else None
            except subprocess.TimeoutExpired:
                rc = None
            outcomes.append((rc, _error_lines(srv.log)))
            srv.kill()
    assert outcomes[0] == (1, [f"shoal: HTTP port {port} is in use (--http-port)"])
    assert outcomes[1] == outcomes[0]
