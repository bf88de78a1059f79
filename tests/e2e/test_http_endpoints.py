"""Every HTTP endpoint through the real server with the unmodified tritonclient."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository


def raw(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{server.url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_health_and_server_metadata(server: ServerProcess) -> None:
    c = server.client()
    assert c.is_server_live()
    assert c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "shoal"
    assert meta["extensions"] == [
        "classification",
        "sequence",
        "model_repository",
        "model_repository(unload_dependents)",
        "schedule_policy",
        "model_configuration",
        "system_shared_memory",
        "cuda_shared_memory",
        "binary_tensor_data",
        "parameters",
        "statistics",
        "trace",
        "logging",
    ]
    status, _, body = raw(server, "GET", "/v2/health/ready")
    assert (status, body) == (200, b"")


def test_model_metadata(server: ServerProcess) -> None:
    c = server.client()
    meta = c.get_model_metadata("simple_onnx")
    assert meta["name"] == "simple_onnx"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert c.get_model_metadata("add_sub", "1")["platform"] == "python"
    assert c.get_model_metadata("strings")["inputs"][0]["datatype"] == "BYTES"


def test_model_ready(server: ServerProcess) -> None:
    c = server.client()
    assert c.is_model_ready("add_sub")
    assert c.is_model_ready("add_sub", "1")
    assert not c.is_model_ready("add_sub", "7")
    assert not c.is_model_ready("no_such_model")
    status, _, body = raw(server, "GET", "/v2/models/no_such_model/ready")
    assert status == 400 and "unknown model" in json.loads(body)["error"]
    status, _, body = raw(server, "GET", "/v2/models/add_sub/versions/7/ready")
    assert status == 404 and "version 7" in json.loads(body)["error"]


def test_model_config(server: ServerProcess) -> None:
    cfg = server.client().get_model_config("simple_onnx")
    assert cfg["name"] == "simple_onnx"
    assert cfg["backend"] == "onnxruntime"
    assert cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0]["dims"] == [16]  # a number, not a string
    assert cfg["input"][0]["data_type"] == "TYPE_INT32"
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert cfg["version_policy"] == {"latest": {"num_versions": 1}}


def test_unknown_path_and_method(server: ServerProcess) -> None:
    status, _, body = raw(server, "GET", "/v2/nothing/here")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    status, _, body = raw(server, "DELETE", "/v2/models/add_sub")
    assert status == 405 and json.loads(body) == {"error": "Method Not Allowed"}
    status, _, body = raw(server, "GET", "/v2/models/add_sub/infer")
    assert status == 405


def test_unknown_model_errors(server: ServerProcess) -> None:
    c = server.client()
    with pytest.raises(InferenceServerException, match="unknown model: 'nope'"):
        c.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown model: 'nope'"):
        c.get_model_config("nope")
    status, _, _ = raw(server, "GET", "/v2/models/add_sub/versions/3")
    assert status == 404


def test_model_name_is_url_quoted(server: ServerProcess) -> None:
    status, _, body = raw(server, "GET", "/v2/models/a%2F..%2Fb")
    assert status in (400, 404)
    assert "error" in json.loads(body)


def test_infer_add_sub_json_and_binary(server: ServerProcess) -> None:
    c = server.client()
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 2.0, dtype=np.float32)
    for binary_in in (True, False):
        for binary_out in (True, False):
            i0 = httpclient.InferInput("INPUT0", [4], "FP32")
            i0.set_data_from_numpy(a, binary_data=binary_in)
            i1 = httpclient.InferInput("INPUT1", [4], "FP32")
            i1.set_data_from_numpy(b, binary_data=binary_in)
            outs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
            r = c.infer("add_sub", [i0, i1], outputs=outs, request_id="req-7")
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
            resp = r.get_response()
            assert resp["id"] == "req-7"
            assert resp["model_version"] == "1"
            if not binary_out:
                assert "parameters" not in resp["outputs"][0]


def test_only_requested_outputs_come_back(server: ServerProcess) -> None:
    c = server.client()
    i0 = httpclient.InferInput("INPUT0", [4], "FP32")
    i0.set_data_from_numpy(np.ones(4, np.float32))
    i1 = httpclient.InferInput("INPUT1", [4], "FP32")
    i1.set_data_from_numpy(np.ones(4, np.float32))
    r = c.infer("add_sub", [i0, i1], outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert [o["name"] for o in r.get_response()["outputs"]] == ["OUTPUT1"]
    assert "id" not in r.get_response()


def test_onnx_batching_model(server: ServerProcess) -> None:
    c = server.client()
    a = np.arange(48, dtype=np.int32).reshape(3, 16)
    b = np.ones((3, 16), dtype=np.int32)
    i0 = httpclient.InferInput("INPUT0", [3, 16], "INT32")
    i0.set_data_from_numpy(a)
    i1 = httpclient.InferInput("INPUT1", [3, 16], "INT32")
    i1.set_data_from_numpy(b, binary_data=False)
    r = c.infer("simple_onnx", [i0, i1])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


def test_raw_binary_body(server: ServerProcess) -> None:
    data = np.arange(10, dtype=np.float32)
    status, headers, body = raw(
        server,
        "POST",
        "/v2/models/identity_fp32/infer",
        data.tobytes(),
        {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    hl = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:hl])
    assert head["outputs"][0]["shape"] == [10]
    assert np.array_equal(np.frombuffer(body[hl:], dtype=np.float32), data)


def test_gzip_request_and_response(server: ServerProcess) -> None:
    c = server.client()
    data = np.arange(1000, dtype=np.float32)
    for algo in ("gzip", "deflate"):
        i = httpclient.InferInput("INPUT0", [1000], "FP32")
        i.set_data_from_numpy(data)
        r = c.infer("identity_fp32", [i], request_compression_algorithm=algo, response_compression_algorithm=algo)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)
    status, _, body = raw(server, "POST", "/v2/models/identity_fp32/infer", b"{}", {"Content-Encoding": "br"})
    assert status == 501 and "Content-Encoding" in json.loads(body)["error"]


def test_large_tensors_go_through_shared_memory(server: ServerProcess) -> None:
    c = server.client()
    data = np.random.default_rng(0).random(1 << 20, dtype=np.float32)  # 4 MiB
    i = httpclient.InferInput("INPUT0", [data.size], "FP32")
    i.set_data_from_numpy(data)
    r = c.infer("identity_fp32", [i])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)
    segs = server.segments()
    assert any("_in_" in s for s in segs), segs  # the router's input arena was used
    assert any("_w" in s for s in segs), segs  # and a worker's output arena


def test_python_model_exception_is_500_and_model_keeps_serving(server: ServerProcess) -> None:
    c = server.client()
    i = httpclient.InferInput("INPUT0", [1], "INT32")
    i.set_data_from_numpy(np.array([3], dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        c.infer("crashy", [i])
    assert "crashy was asked to fail" in str(info.value)
    assert info.value.status() == "500"
    i.set_data_from_numpy(np.array([0], dtype=np.int32))
    assert c.infer("crashy", [i]).as_numpy("OUTPUT0")[0] == 0


def test_server_id_names_the_server(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """``--id`` (as tritonserver's): Triton's health/metadata examples check the name."""
    srv = ServerProcess(make_repository(tmp_path / "repo", "add_sub"), "--id", "triton").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        assert h.get_server_metadata()["name"] == "triton"
        assert g.get_server_metadata().name == "triton"
    finally:
        h.close()
        g.close()
