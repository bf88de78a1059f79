"""Triton's trace extension through the real server: settings over HTTP and gRPC (global and
per model, updates, clearing, Triton's error texts), the trace file of ``triton`` mode (every
timestamp, in order; ensemble steps and BLS calls under their parent), sampling rate and
count, log-frequency rotation, TENSORS content, and ``opentelemetry`` mode's spans sent to an
OTLP/HTTP collector run by the test."""

from __future__ import annotations

import http.server
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until

MODELS = ("add_sub", "slow", "ens_diamond", "bls_traced", "identity_fp32", "repeat")
STAMPS_HTTP = [
    "HTTP_RECV_START",
    "HTTP_RECV_END",
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
    "REQUEST_END",
    "INFER_RESPONSE_COMPLETE",
    "HTTP_SEND_START",
    "HTTP_SEND_END",
]
STAMPS_GRPC = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *STAMPS_HTTP[2:-2], "GRPC_SEND_START", "GRPC_SEND_END"]
CORE_STAMPS = ["REQUEST_START", "QUEUE_START", *STAMPS_HTTP[4:9]]
CLEAR = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces") / "trace.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trace_file: Path) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), *MODELS)
    srv = ServerProcess(
        repo,
        "--trace-config",
        f"triton,file={trace_file}",
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=1",
    ).start()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), srv.segments()
    # the file is one JSON array once the server has stopped (written with the first trace, as
    # Triton's: a run of tests that traced nothing, such as a -k subset, leaves none)
    if trace_file.exists():
        assert isinstance(json.loads(trace_file.read_text()), list)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    """An HTTP client; every trace setting is cleared again after the test (as Triton's tests)."""
    c = server.client()
    yield c
    for model in MODELS:
        c.update_trace_settings(model_name=model, settings=CLEAR)
    c.update_trace_settings(settings=CLEAR)


@pytest.fixture
def gclient(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _initial(trace_file: Path) -> dict[str, Any]:
    return {
        "trace_level": ["TIMESTAMPS"],
        "trace_rate": "1",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_file": str(trace_file),
        "trace_mode": "triton",
    }


def _grpc_settings(c: grpcclient.InferenceServerClient, **kw: Any) -> dict[str, Any]:
    got = c.get_trace_settings(as_json=True, **kw)["settings"]
    return {k: v["value"] if k == "trace_level" else v["value"][0] for k, v in got.items()}


def _traces(path: Path) -> list[dict[str, Any]]:
    """The objects of a trace file, read while the server writes it (no closing bracket yet)."""
    text = path.read_text() if path.exists() else ""
    if not text:
        return []
    if not text.endswith("]"):
        text += "]"
    out: list[dict[str, Any]] = json.loads(text)
    return out


def _by_id(objects: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Trace id -> {"model": the model record, "stamps": [(name, ns)], "tensors": [...]}."""
    out: dict[int, dict[str, Any]] = {}
    for o in objects:
        t = out.setdefault(o["id"], {"model": None, "stamps": [], "tensors": []})
        if "model_name" in o:
            assert t["model"] is None, f"trace id {o['id']} used twice"
            t["model"] = o
        elif "timestamps" in o:
            assert len(o["timestamps"]) == 1
            t["stamps"].append((o["timestamps"][0]["name"], o["timestamps"][0]["ns"]))
        else:
            t["tensors"].append(o)
    return out


def _tree(path: Path, request_id: str, children: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The root trace of the request ``request_id`` and its ``children`` (waited for)."""
    found: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    def look() -> bool:
        try:
            traces = _by_id(_traces(path))
        except json.JSONDecodeError:  # read during one of the writer's writes: look again
            return False
        roots = [
            t
            for t in traces.values()
            if t["model"] is not None and t["model"].get("request_id") == request_id and "parent_id" not in t["model"]
        ]
        if len(roots) != 1:
            return False
        rid = roots[0]["model"]["id"]
        kids = [t for t in traces.values() if t["model"] is not None and t["model"].get("parent_id") == rid]
        if len(kids) < children:
            return False
        found.append((roots[0], kids))
        return True

    wait_until(look, timeout_s=20)
    return found[-1]


def _names(trace: dict[str, Any]) -> list[str]:
    return [name for name, _ in trace["stamps"]]


def _ordered(trace: dict[str, Any]) -> None:
    times = [ns for _, ns in trace["stamps"]]
    assert times == sorted(times), trace["stamps"]
    assert all(isinstance(ns, int) and ns > 0 for ns in times)


def _http_inputs(a: np.ndarray, b: np.ndarray) -> list[httpclient.InferInput]:
    out = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        t = httpclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


# ---- settings -------------------------------------------------------------------------------


def test_server_metadata_lists_trace(client: httpclient.InferenceServerClient) -> None:
    ext = client.get_server_metadata()["extensions"]
    assert "trace" in ext and ext.index("trace") == ext.index("statistics") + 1 == ext.index("logging") - 1


def test_settings_start_from_the_command_line(
    client: httpclient.InferenceServerClient, gclient: grpcclient.InferenceServerClient, trace_file: Path
) -> None:
    expected = _initial(trace_file)
    assert client.get_trace_settings() == expected
    assert client.get_trace_settings(model_name="add_sub") == expected
    assert _grpc_settings(gclient) == expected
    assert _grpc_settings(gclient, model_name="add_sub") == expected
    with pytest.raises(InferenceServerException, match="Request for unknown model : does-not-exist"):
        client.get_trace_settings(model_name="does-not-exist")
    with pytest.raises(InferenceServerException, match="Request for unknown model : does-not-exist"):
        gclient.get_trace_settings(model_name="does-not-exist")


def test_model_settings_mirror_the_global_ones_until_cleared(
    client: httpclient.InferenceServerClient, trace_file: Path
) -> None:
    """Triton's test_http_clear_settings (qa/L0_trace/trace_endpoint_test.py)."""
    client.update_trace_settings(model_name="add_sub", settings={"trace_rate": "12", "log_frequency": "34"})
    client.update_trace_settings(settings={"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]})
    base = _initial(trace_file)
    expected_global = {**base, "trace_level": ["OFF"]}
    first_model = {**base, "trace_level": ["OFF"], "trace_rate": "12", "log_frequency": "34"}
    second_model = {**base, "trace_level": ["OFF"], "log_frequency": "34"}
    assert client.update_trace_settings(settings={"trace_rate": None, "trace_count": None}) == expected_global
    assert client.get_trace_settings(model_name="add_sub") == first_model
    cleared = client.update_trace_settings(model_name="add_sub", settings={"trace_rate": None, "trace_level": None})
    assert cleared == second_model
    assert client.get_trace_settings() == expected_global
    # a model whose every field is cleared follows the global setting again
    client.update_trace_settings(model_name="add_sub", settings={"log_frequency": None})
    client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS", "TENSORS"]})
    levels = client.get_trace_settings(model_name="add_sub")["trace_level"]
    assert levels == ["TIMESTAMPS", "TENSORS"]


def test_grpc_updates_and_clears(
    client: httpclient.InferenceServerClient, gclient: grpcclient.InferenceServerClient, trace_file: Path
) -> None:
    base = _initial(trace_file)
    got = gclient.update_trace_settings(model_name="add_sub", settings={"trace_rate": "12"}, as_json=True)
    assert got["settings"]["trace_rate"] == {"value": ["12"]}
    gclient.update_trace_settings(settings={"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_count": "5"})
    assert _grpc_settings(gclient, model_name="add_sub") == {
        **base,
        "trace_level": ["TIMESTAMPS", "TENSORS"],
        "trace_rate": "12",
        "trace_count": "5",
    }
    # no value clears (tritonclient sends None as an empty value)
    gclient.update_trace_settings(model_name="add_sub", settings={"trace_rate": None})
    gclient.update_trace_settings(settings={"trace_level": None, "trace_count": None})
    assert _grpc_settings(gclient, model_name="add_sub") == base
    assert client.get_trace_settings() == base


@pytest.mark.parametrize(
    ("settings", "status", "message"),
    [
        ({"trace_file": "elsewhere.log"}, 501, "trace file location can not be updated through network protocol"),
        ({"trace_rate": "abc"}, 400, "Unable to parse 'trace_rate', got: abc"),
        (
            {"trace_rate": "10000000000"},
            400,
            "Unable to parse 'trace_rate', value is out of range [ 0, 4294967295 ], got: 10000000000",
        ),
        (
            {"trace_count": "10000000000"},
            400,
            "Unable to parse 'trace_count', value is out of range [ -1, 2147483647 ], got: 10000000000",
        ),
        ({"trace_count": "-5"}, 400, "Unable to parse 'trace_count'. Expecting value >= -1, got:-5"),
        ({"log_frequency": "x"}, 400, "Unable to parse 'log_frequency', got: x"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, 400, "Expect only one trace level 'OFF' is specified"),
        ({"trace_rate": 5}, 400, "attempt to access JSON non-string as string"),
        ({"trace_level": "TIMESTAMPS"}, 400, "attempt to access JSON non-array as array"),
        ({"trace_rate": "0"}, 400, "Attempting to set invalid trace setting :sample rate must be non-zero"),
    ],
)
def test_http_refuses_bad_values(
    server: ServerProcess, client: httpclient.InferenceServerClient, settings: dict[str, Any], status: int, message: str
) -> None:
    before = client.get_trace_settings()
    for path in ("/v2/trace/setting", "/v2/models/add_sub/trace/setting"):
        r = requests.post(f"http://{server.url}{path}", data=json.dumps(settings), timeout=10)
        assert r.status_code == status, r.text
        assert r.json() == {"error": message}
    assert client.get_trace_settings() == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"trace_file": "elsewhere.log"}, "trace file location can not be updated through network protocol"),
        ({"trace_count": "-5"}, "Unable to parse 'trace_count'. Expecting value >= -1, got: -5"),
        ({"trace_rate": ["1", "2"]}, "expect only 1 value for 'trace_rate'"),
        ({"log_frequency": "y"}, "Unable to parse 'log_frequency', got: y"),
    ],
)
def test_grpc_refuses_bad_values(
    client: httpclient.InferenceServerClient,
    gclient: grpcclient.InferenceServerClient,
    settings: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        gclient.update_trace_settings(settings=settings)
    assert info.value.message() == message
    expected_status = "StatusCode.UNIMPLEMENTED" if "trace_file" in settings else "StatusCode.INVALID_ARGUMENT"
    assert info.value.status() == expected_status


# ---- the trace file -------------------------------------------------------------------------


def test_http_request_trace(client: httpclient.InferenceServerClient, trace_file: Path) -> None:
    a = np.arange(4, dtype=np.float32)
    client.infer("add_sub", _http_inputs(a, a), request_id="http-1")
    root, kids = _tree(trace_file, "http-1")
    assert kids == []
    assert root["model"]["model_name"] == "add_sub" and root["model"]["model_version"] == 1
    assert _names(root) == STAMPS_HTTP
    _ordered(root)
    assert root["tensors"] == []


def test_grpc_request_trace(gclient: grpcclient.InferenceServerClient, trace_file: Path) -> None:
    a = np.ones(4, dtype=np.float32)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = grpcclient.InferInput(name, [4], "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    gclient.infer("add_sub", inputs, request_id="grpc-1")
    root, _ = _tree(trace_file, "grpc-1")
    assert _names(root) == STAMPS_GRPC
    _ordered(root)


def test_decoupled_request_whose_final_response_comes_before_execute_returns(
    client: httpclient.InferenceServerClient, gclient: grpcclient.InferenceServerClient, trace_file: Path
) -> None:
    """The final response reaches the client while the model's execute still runs: the
    request is not cancelled (statistics count a success, no failure) and its trace, written
    once the execution has ended, has the compute stamps and REQUEST_END."""
    before = client.get_inference_statistics("repeat")["model_stats"][0]["inference_stats"]
    responses: queue.Queue[Any] = queue.Queue()
    gclient.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        t = grpcclient.InferInput("IN", [2], "INT32")
        t.set_data_from_numpy(np.array([7, 8], dtype=np.int32))
        gclient.async_stream_infer(
            "repeat", [t], request_id="final-early", parameters={"mode": "execute", "work_ms": 400}
        )
        got = [responses.get(timeout=20) for _ in range(2)]
    finally:
        gclient.stop_stream()
    assert [e for _, e in got] == [None, None]
    root, _ = _tree(trace_file, "final-early")
    want = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *CORE_STAMPS, "GRPC_SEND_START"]
    assert sorted(_names(root)) == sorted(want)
    at = dict(root["stamps"])
    assert at["GRPC_SEND_START"] < at["COMPUTE_END"] <= at["REQUEST_END"]  # sent while execute ran

    def counted() -> bool:
        now = client.get_inference_statistics("repeat")["model_stats"][0]["inference_stats"]
        return now["success"]["count"] == before["success"]["count"] + 1

    wait_until(counted, timeout_s=20)
    after = client.get_inference_statistics("repeat")["model_stats"][0]["inference_stats"]
    assert after["fail"]["count"] == before["fail"]["count"]


def test_ensemble_steps_have_the_ensemble_as_parent(client: httpclient.InferenceServerClient, trace_file: Path) -> None:
    x = httpclient.InferInput("X", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    client.infer("ens_diamond", [x], request_id="ens-1")
    root, kids = _tree(trace_file, "ens-1", children=3)
    assert root["model"]["model_name"] == "ens_diamond"
    # the ensemble itself computes nothing: its steps do
    assert _names(root) == ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", *STAMPS_HTTP[8:]]
    _ordered(root)
    assert sorted(k["model"]["model_name"] for k in kids) == ["add_sub", "slow", "slow"]
    start = dict(root["stamps"])["REQUEST_START"]
    end = dict(root["stamps"])["REQUEST_END"]
    ids = {root["model"]["id"]}
    for k in kids:
        assert k["model"]["parent_id"] == root["model"]["id"]
        assert _names(k) == CORE_STAMPS
        _ordered(k)
        assert start <= k["stamps"][0][1] and k["stamps"][-1][1] <= end
        ids.add(k["model"]["id"])
    assert len(ids) == 4
    # add_sub reads both slow steps' outputs: it starts after they end
    add = next(k for k in kids if k["model"]["model_name"] == "add_sub")
    slow_ends = [dict(k["stamps"])["REQUEST_END"] for k in kids if k is not add]
    assert dict(add["stamps"])["REQUEST_START"] >= max(slow_ends)


def test_bls_call_made_with_the_request_trace_is_its_child(
    client: httpclient.InferenceServerClient, trace_file: Path
) -> None:
    a = np.arange(4, dtype=np.float32)
    out = client.infer("bls_traced", _http_inputs(a, a), request_id="bls-1").as_numpy("OUTPUT0")
    assert np.array_equal(out, a + a)
    root, kids = _tree(trace_file, "bls-1", children=1)
    assert root["model"]["model_name"] == "bls_traced"
    assert _names(root) == STAMPS_HTTP
    # the call without trace=request.trace() is not traced (Triton's rule)
    assert [k["model"]["model_name"] for k in kids] == ["add_sub"]
    child = kids[0]
    assert _names(child) == CORE_STAMPS
    stamps = dict(root["stamps"])
    assert stamps["COMPUTE_START"] <= dict(child["stamps"])["REQUEST_START"]
    assert dict(child["stamps"])["REQUEST_END"] <= stamps["COMPUTE_END"]


def test_untraced_model_writes_nothing(client: httpclient.InferenceServerClient, trace_file: Path) -> None:
    client.update_trace_settings(model_name="identity_fp32", settings={"trace_level": ["OFF"]})
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.ones(2, dtype=np.float32))
    client.infer("identity_fp32", [t], request_id="off-1")
    a = np.ones(4, dtype=np.float32)
    client.infer("add_sub", _http_inputs(a, a), request_id="off-2")
    _tree(trace_file, "off-2")  # written after off-1 finished
    assert not [o for o in _traces(trace_file) if o.get("request_id") == "off-1"]


def test_tensors_level_records_inputs_and_outputs(client: httpclient.InferenceServerClient, trace_file: Path) -> None:
    client.update_trace_settings(model_name="add_sub", settings={"trace_level": ["TIMESTAMPS", "TENSORS"]})
    a = np.array([1.5, 2, 3, 4], dtype=np.float32)
    b = np.array([0.25, 1, 1, 1e-7], dtype=np.float32)
    client.infer("add_sub", _http_inputs(a, b), request_id="tensors-1")
    root, _ = _tree(trace_file, "tensors-1")
    assert _names(root) == STAMPS_HTTP
    got = {(t["activity"], t["tensor"]["name"]): t["tensor"] for t in root["tensors"]}
    assert set(got) == {
        ("TENSOR_QUEUE_INPUT", "INPUT0"),
        ("TENSOR_QUEUE_INPUT", "INPUT1"),
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT0"),
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT1"),
    }
    assert got["TENSOR_QUEUE_INPUT", "INPUT0"] == {"name": "INPUT0", "data": "1.5,2,3,4", "shape": "4", "dtype": "FP32"}
    assert got["TENSOR_QUEUE_INPUT", "INPUT1"]["data"] == "0.25,1,1,1e-07"
    assert got["TENSOR_BACKEND_OUTPUT", "OUTPUT0"]["data"] == "1.75,3,4,4"
    assert got["TENSOR_BACKEND_OUTPUT", "OUTPUT1"] == {
        "name": "OUTPUT1",
        "data": "1.25,1,2,4",
        "shape": "4",
        "dtype": "FP32",
    }
    # TENSORS alone: tensors without timestamps (and so without the model record), as Triton
    client.update_trace_settings(model_name="add_sub", settings={"trace_level": ["TENSORS"]})
    before = len(_traces(trace_file))
    client.infer("add_sub", _http_inputs(a, b), request_id="tensors-2")
    wait_until(lambda: len(_traces(trace_file)) >= before + 4)
    new = _traces(trace_file)[before:]
    assert len(new) == 4 and all("activity" in o for o in new)


# ---- sampling, count and files --------------------------------------------------------------


def _identity(srv: ServerProcess, request_id: str) -> None:
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.ones(2, dtype=np.float32))
    srv.client().infer("identity_fp32", [t], request_id=request_id)


def _request_ids(path: Path) -> list[str]:
    return [o["request_id"] for o in _traces(path) if "request_id" in o]


def test_rate_and_count(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """One request in ``rate`` is traced until ``count`` traces are made; then the count's
    traces are in ``<file>.0`` (and more once the count is set again)."""
    out = tmp_path / "t.json"
    srv = ServerProcess(
        make_repository(tmp_path / "repo", "identity_fp32"),
        "--trace-config",
        f"triton,file={out}",
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=3",
        "--trace-config",
        "count=2",
    )
    fresh_server.append(srv)
    srv.start()
    c = srv.client()
    assert c.get_trace_settings()["trace_count"] == "2"
    for i in range(9):
        _identity(srv, f"r{i}")
    assert c.get_trace_settings()["trace_count"] == "0"
    first = Path(f"{out}.0")
    wait_until(first.exists)
    assert _request_ids(first) == ["r2", "r5"]
    c.update_trace_settings(settings={"trace_count": "1", "trace_rate": "2"})
    for i in range(9, 14):
        _identity(srv, f"r{i}")
    second = Path(f"{out}.1")
    wait_until(second.exists)
    assert _request_ids(second) == ["r10"]
    assert srv.terminate() == 0
    assert not out.exists()  # every trace went to an indexed file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("t.json")) == ["t.json.0", "t.json.1"]


def test_log_frequency_rotates_files(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    out = tmp_path / "t.json"
    srv = ServerProcess(
        make_repository(tmp_path / "repo", "identity_fp32"),
        "--trace-config",
        f"triton,file={out}",
        "--trace-config",
        "triton,log-frequency=2",
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=1",
    )
    fresh_server.append(srv)
    srv.start()
    assert srv.client().get_trace_settings()["log_frequency"] == "2"
    for i in range(5):
        _identity(srv, f"f{i}")
    wait_until(lambda: Path(f"{out}.1").exists())
    assert _request_ids(Path(f"{out}.0")) == ["f0", "f1"]
    assert _request_ids(Path(f"{out}.1")) == ["f2", "f3"]
    assert srv.terminate() == 0
    assert _request_ids(Path(f"{out}.2")) == ["f4"]  # the rest, when the server stops
    assert not out.exists()


def test_bad_trace_config_stops_the_server(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "identity_fp32")
    for args, message in (
        (("--trace-config", "level=LOUD"), "invalid value for trace level option: loud"),
        (("--trace-config", "jaeger,url=x"), 'invalid value for trace mode option: jaeger. Available options are "'),
        (("--trace-config", "rate=often"), "Invalid option value. Got often"),
    ):
        srv = ServerProcess(repo, *args)
        fresh_server.append(srv)
        with pytest.raises(RuntimeError, match="exited with status 1"):
            srv.start()
        assert message in srv.log


def test_tracing_a_model_only(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """Tracing off globally, on for one model: the frontends find a setting that samples."""
    out = tmp_path / "t.json"
    srv = ServerProcess(
        make_repository(tmp_path / "repo", "identity_fp32", "add_sub"), "--trace-config", f"triton,file={out}"
    )
    fresh_server.append(srv)
    srv.start()
    c = srv.client()
    assert c.get_trace_settings()["trace_level"] == ["OFF"]
    c.update_trace_settings(model_name="identity_fp32", settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    _identity(srv, "m1")
    a = np.ones(4, dtype=np.float32)
    c.infer("add_sub", _http_inputs(a, a), request_id="m2")
    assert srv.terminate() == 0
    assert _request_ids(out) == ["m1"]


# ---- OpenTelemetry --------------------------------------------------------------------------


class _Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver: keeps the spans of every export request."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for rs in msg.resource_spans:
                    collector.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_opentelemetry_spans(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the trace extra (opentelemetry-sdk) is not installed")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    collector = _Collector()
    try:
        srv = ServerProcess(
            make_repository(tmp_path / "repo", "add_sub", "slow", "ens_diamond"),
            "--trace-config",
            "mode=opentelemetry",
            "--trace-config",
            f"opentelemetry,url={collector.url}",
            "--trace-config",
            "opentelemetry,resource=service.version=7",
            "--trace-config",
            "opentelemetry,bsp_schedule_delay=50",
            "--trace-config",
            "level=TIMESTAMPS",
            "--trace-config",
            "rate=1",
        )
        fresh_server.append(srv)
        srv.start()
        c = srv.client()
        settings = c.get_trace_settings()
        assert settings["trace_mode"] == "opentelemetry" and "trace_file" not in settings
        assert settings["url"] == collector.url and settings["bsp_schedule_delay"] == "50"
        assert settings["bsp_max_queue_size"] == "2048" and settings["bsp_max_export_batch_size"] == "512"
        x = httpclient.InferInput("X", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        c.infer("ens_diamond", [x], request_id="otel-1")
        # a client's W3C trace context: the request is traced under it
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        a = np.ones(4, dtype=np.float32)
        c.infer("add_sub", _http_inputs(a, a), headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert srv.terminate() == 0  # flushes the batch span processor
    finally:
        collector.shutdown()
        collector.server_close()
    spans = collector.spans
    assert collector.resources and collector.resources[0]["service.name"] == "triton-inference-server"
    assert collector.resources[0]["service.version"] == "7"
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.name == "InferRequest"]
    assert len(roots) == 2
    ens = next(s for s in spans if s.name == "ens_diamond")
    root = by_id[ens.parent_span_id]
    assert root.name == "InferRequest"
    assert [e.name for e in root.events] == [
        "HTTP_RECV_START",
        "HTTP_RECV_END",
        "INFER_RESPONSE_COMPLETE",
        "HTTP_SEND_START",
        "HTTP_SEND_END",
    ]
    assert _attrs(ens)["triton.model_name"] == "ens_diamond" and _attrs(ens)["triton.request_id"] == "otel-1"
    assert [e.name for e in ens.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
    steps = [s for s in spans if s.parent_span_id == ens.span_id]
    assert sorted(s.name for s in steps) == ["add_sub", "slow", "slow"]
    for step in steps:
        assert _attrs(step)["triton.trace_parent_id"] == _attrs(ens)["triton.trace_id"]
        assert [e.name for e in step.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
        (compute,) = [s for s in spans if s.parent_span_id == step.span_id]
        assert compute.name == "compute"
        assert [e.name for e in compute.events] == [
            "COMPUTE_START",
            "COMPUTE_INPUT_END",
            "COMPUTE_OUTPUT_START",
            "COMPUTE_END",
        ]
        assert step.start_time_unix_nano <= compute.start_time_unix_nano
        assert compute.end_time_unix_nano <= step.end_time_unix_nano
        assert ens.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano
        assert step.end_time_unix_nano <= ens.end_time_unix_nano
    propagated = next(s for s in roots if s is not root)
    assert propagated.trace_id.hex() == trace_id and propagated.parent_span_id.hex() == parent


def test_cache_hit_is_traced_without_compute(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    out = tmp_path / "t.json"
    repo = make_repository(tmp_path / "repo", "identity_fp32")
    config = repo / "identity_fp32" / "config.pbtxt"
    config.write_text(config.read_text() + "\nresponse_cache { enable: true }\n")
    srv = ServerProcess(
        repo,
        "--cache-config=local,size=1048576",
        "--trace-config",
        f"triton,file={out}",
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=1",
    )
    fresh_server.append(srv)
    srv.start()
    _identity(srv, "miss")
    _identity(srv, "hit")
    assert srv.terminate() == 0
    traces = _by_id(_traces(out))
    by_request = {t["model"]["request_id"]: t for t in traces.values()}
    assert _names(by_request["miss"]) == STAMPS_HTTP
    assert _names(by_request["hit"]) == [*STAMPS_HTTP[:4], *STAMPS_HTTP[8:]]
