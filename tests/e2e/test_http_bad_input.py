"""Bad input gets a clear 4xx naming what was wrong, and never hurts the router."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess


def post(server: ServerProcess, model: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data)["error"] if resp.status != 200 else ""


def jpost(server: ServerProcess, model: str, obj: object) -> tuple[int, str]:
    return post(server, model, json.dumps(obj).encode())


def add_sub_input(
    name: str = "INPUT0", dt: str = "FP32", shape: list[int] | None = None, data: object = None
) -> dict[str, object]:
    return {"name": name, "datatype": dt, "shape": shape or [4], "data": data if data is not None else [1, 2, 3, 4]}


CASES = [
    ("malformed json", b"{not json", {}, "failed to parse the request JSON"),
    ("json array", b"[1,2]", {}, "must be an object"),
    ("no inputs", b"{}", {}, "'inputs' array"),
    ("header length not int", b"{}", {"Inference-Header-Content-Length": "abc"}, "not an integer"),
    ("header length negative", b"{}", {"Inference-Header-Content-Length": "-1"}, "outside the body"),
    ("header length past body", b"{}", {"Inference-Header-Content-Length": "999"}, "outside the body"),
]


@pytest.mark.parametrize(("body", "headers", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_body_errors(server: ServerProcess, body: bytes, headers: dict[str, str], message: str) -> None:
    status, err = post(server, "add_sub", body, headers)
    assert status == 400
    assert message in err


def test_wrong_input_name(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input("NOPE"), add_sub_input("INPUT1")]})
    assert status == 400 and "'NOPE'" in err


def test_wrong_datatype(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(dt="INT32"), add_sub_input("INPUT1")]})
    assert status == 400 and "'INPUT0'" in err and "INT32" in err and "FP32" in err


def test_invalid_datatype_string(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(dt="FLOAT"), add_sub_input("INPUT1")]})
    assert (status, err) == (400, "invalid datatype for input INPUT0")  # Triton's text


def test_wrong_shape(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(shape=[2, 2]), add_sub_input("INPUT1")]})
    assert status == 400 and "'INPUT0'" in err and "shape" in err


def test_data_count_disagrees_with_shape(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(data=[1, 2, 3]), add_sub_input("INPUT1")]})
    # Triton's text (its code is INTERNAL; a client's mistake is a 400 here)
    assert (status, err) == (400, "Failed to parse 'data' field: shape does not match true shape")


def test_missing_input(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input()]})
    assert status == 400 and "INPUT1" in err


def test_duplicate_input(server: ServerProcess) -> None:
    status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(), add_sub_input()]})
    assert (status, err) == (400, "[request id: <id_unknown>] input 'INPUT0' already exists in request")


def test_unknown_output(server: ServerProcess) -> None:
    status, err = jpost(
        server, "add_sub", {"inputs": [add_sub_input(), add_sub_input("INPUT1")], "outputs": [{"name": "OUT9"}]}
    )
    assert status == 400 and "OUT9" in err


def test_negative_and_fractional_shapes(server: ServerProcess) -> None:
    for shape in ([-4], [1.5], ["4"]):
        status, err = jpost(server, "add_sub", {"inputs": [add_sub_input(shape=shape), add_sub_input("INPUT1")]})  # type: ignore[arg-type]
        assert (status, err) == (
            400,
            "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer",
        )


def test_batch_too_large(server: ServerProcess) -> None:
    a = {"name": "INPUT0", "datatype": "INT32", "shape": [9, 16], "parameters": {"binary_data_size": 9 * 64}}
    b = {"name": "INPUT1", "datatype": "INT32", "shape": [9, 16], "parameters": {"binary_data_size": 9 * 64}}
    head = json.dumps({"inputs": [a, b]}).encode()
    status, err = post(
        server, "simple_onnx", head + bytes(2 * 9 * 64), {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 400 and "batch-size must be <= 8" in err


def binary_request(inputs: list[tuple[str, str, list[int], int]], blob: bytes) -> tuple[bytes, dict[str, str]]:
    spec = [
        {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": size}} for n, d, s, size in inputs
    ]
    head = json.dumps({"inputs": spec}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def test_binary_size_larger_than_body(server: ServerProcess) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [4], 16), ("INPUT1", "FP32", [4], 16)], bytes(20))
    status, err = post(server, "add_sub", body, headers)
    assert status == 400 and "INPUT1" in err


def test_binary_leftover_bytes(server: ServerProcess) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [4], 16), ("INPUT1", "FP32", [4], 16)], bytes(40))
    status, err = post(server, "add_sub", body, headers)
    assert status == 400 and "unexpected additional input data" in err


def test_binary_size_disagrees_with_shape(server: ServerProcess) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [4], 12), ("INPUT1", "FP32", [4], 16)], bytes(28))
    status, err = post(server, "add_sub", body, headers)
    assert status == 400 and "'INPUT0'" in err and "Expected 16, got 12" in err


def test_shape_that_overflows(server: ServerProcess) -> None:
    big = [2**62, 2**62]
    body, headers = binary_request([("IN_FP32", "FP32", big, 16)], bytes(16))
    status, err = post(server, "echo_all", body, headers)
    assert status == 400 and "IN_FP32" in err
    status, err = jpost(
        server, "echo_all", {"inputs": [{"name": "IN_FP32", "datatype": "FP32", "shape": [2**64 + 1], "data": [1]}]}
    )
    assert status == 400


def test_malformed_bytes_tensor(server: ServerProcess) -> None:
    # one element claiming 100 bytes but carrying 3
    blob = (100).to_bytes(4, "little") + b"abc"
    body, headers = binary_request([("IN_BYTES", "BYTES", [1], len(blob))], blob)
    status, err = post(server, "echo_all", body, headers)
    assert status == 400 and "IN_BYTES" in err


def test_binary_data_size_without_header(server: ServerProcess) -> None:
    status, err = jpost(
        server,
        "echo_all",
        {"inputs": [{"name": "IN_FP32", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
    )
    assert status == 400 and "IN_FP32" in err


def test_both_data_and_binary(server: ServerProcess) -> None:
    status, err = jpost(
        server,
        "echo_all",
        {
            "inputs": [
                {
                    "name": "IN_FP32",
                    "datatype": "FP32",
                    "shape": [1],
                    "data": [1],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        },
    )
    assert status == 400 and "only one of" in err


def test_json_type_errors(server: ServerProcess) -> None:
    for dt, data in (("BOOL", [1]), ("INT32", [1.5]), ("UINT8", [256]), ("BYTES", [1]), ("FP32", ["x"])):
        status, err = jpost(
            server, "echo_all", {"inputs": [{"name": f"IN_{dt}", "datatype": dt, "shape": [1], "data": data}]}
        )
        assert status == 400 and f"IN_{dt}" in err, (dt, status, err)


def test_deeply_nested_json(server: ServerProcess) -> None:
    data: object = [1.0]
    for _ in range(200):
        data = [data]
    status, err = jpost(
        server, "echo_all", {"inputs": [{"name": "IN_FP32", "datatype": "FP32", "shape": [1], "data": data}]}
    )
    assert status == 400


def test_json_body_limit(tmp_path: object, fresh_server: list[ServerProcess]) -> None:
    from pathlib import Path

    from tests.e2e.server import make_repository

    repo = make_repository(Path(str(tmp_path)) / "repo", "identity_fp32")
    srv = ServerProcess(repo, "--http-max-input-size", "1000").start()
    fresh_server.append(srv)
    status, err = jpost(
        srv, "identity_fp32", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [400], "data": [0.5] * 400}]}
    )
    assert status == 400 and "--http-max-input-size" in err
    assert srv.terminate() == 0


def test_router_survives_all_of_it(server: ServerProcess) -> None:
    c = server.client()
    i0 = httpclient.InferInput("INPUT0", [4], "FP32")
    i0.set_data_from_numpy(np.ones(4, np.float32))
    i1 = httpclient.InferInput("INPUT1", [4], "FP32")
    i1.set_data_from_numpy(np.ones(4, np.float32))
    np.testing.assert_array_equal(c.infer("add_sub", [i0, i1]).as_numpy("OUTPUT0"), np.full(4, 2, np.float32))
    assert c.is_server_ready()
