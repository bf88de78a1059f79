"""Every v2 datatype, JSON and binary, sync and async clients."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([True, False, True]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 7, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 7, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 7, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-32768, 0, 32767], dtype=np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([-1.5, 0.0, 65504.0], dtype=np.float16),
    "FP32": np.array([-1.5, 0.25, 3.4e38], dtype=np.float32),
    "FP64": np.array([-1.5, 0.1, 1e308], dtype=np.float64),
    "BYTES": np.array([b"", b"hello", "h\u00e9llo".encode()], dtype=np.object_),
}
JSON_OK = [t for t in SAMPLES if t not in ("FP16",)]


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_binary_roundtrip(server: ServerProcess, datatype: str) -> None:
    data = SAMPLES[datatype]
    i = httpclient.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    i.set_data_from_numpy(data, binary_data=True)
    r = server.client().infer("echo_all", [i], outputs=[httpclient.InferRequestedOutput(f"OUT_{datatype}")])
    out = r.as_numpy(f"OUT_{datatype}")
    assert out.dtype == data.dtype
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("datatype", JSON_OK)
def test_json_roundtrip(server: ServerProcess, datatype: str) -> None:
    data = SAMPLES[datatype]
    i = httpclient.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    i.set_data_from_numpy(data, binary_data=False)
    r = server.client().infer(
        "echo_all", [i], outputs=[httpclient.InferRequestedOutput(f"OUT_{datatype}", binary_data=False)]
    )
    assert "data" in r.get_response()["outputs"][0]
    out = r.as_numpy(f"OUT_{datatype}")
    if datatype == "BYTES":
        assert [x.encode() if isinstance(x, str) else x for x in out.tolist()] == data.tolist()
    else:
        np.testing.assert_array_equal(out.astype(data.dtype), data)


def test_fp16_json_input_refused(server: ServerProcess) -> None:
    i = httpclient.InferInput("IN_FP16", [3], "FP16")
    i.set_data_from_numpy(SAMPLES["FP16"], binary_data=False)
    with pytest.raises(InferenceServerException, match="FP16 data via JSON is not supported") as info:
        server.client().infer("echo_all", [i])
    assert info.value.status() == "400"


def test_fp16_json_output_refused(server: ServerProcess) -> None:
    i = httpclient.InferInput("IN_FP16", [3], "FP16")
    i.set_data_from_numpy(SAMPLES["FP16"], binary_data=True)
    with pytest.raises(InferenceServerException, match="FP16"):
        server.client().infer("echo_all", [i], outputs=[httpclient.InferRequestedOutput("OUT_FP16", binary_data=False)])


def test_non_utf8_bytes_binary(server: ServerProcess) -> None:
    data = np.array([b"\xff\xfe\x00raw", b"\x00"], dtype=np.object_)
    i = httpclient.InferInput("IN_BYTES", [2], "BYTES")
    i.set_data_from_numpy(data)
    r = server.client().infer("echo_all", [i], outputs=[httpclient.InferRequestedOutput("OUT_BYTES")])
    assert r.as_numpy("OUT_BYTES").tolist() == data.tolist()


def test_several_datatypes_in_one_request(server: ServerProcess) -> None:
    inputs = []
    for dt in ("INT8", "FP64", "BYTES", "BOOL"):
        i = httpclient.InferInput(f"IN_{dt}", [3], dt)
        i.set_data_from_numpy(SAMPLES[dt], binary_data=dt != "BOOL")
        inputs.append(i)
    r = server.client().infer(
        "echo_all",
        inputs,
        outputs=[httpclient.InferRequestedOutput(f"OUT_{dt}") for dt in ("INT8", "FP64", "BYTES", "BOOL")],
    )
    for dt in ("INT8", "FP64", "BYTES", "BOOL"):
        np.testing.assert_array_equal(r.as_numpy(f"OUT_{dt}"), SAMPLES[dt])


def test_zero_element_tensor(server: ServerProcess) -> None:
    i = httpclient.InferInput("INPUT0", [0], "FP32")
    i.set_data_from_numpy(np.zeros(0, dtype=np.float32))
    r = server.client().infer("identity_fp32", [i])
    assert r.as_numpy("OUTPUT0").shape == (0,)


def test_nested_json_data(server: ServerProcess) -> None:
    body = {
        "inputs": [{"name": "IN_INT32", "shape": [4], "datatype": "INT32", "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "OUT_INT32"}],
    }
    import json
    import urllib.request

    req = urllib.request.Request(
        f"http://{server.url}/v2/models/echo_all/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    assert out["outputs"][0]["data"] == [1, 2, 3, 4]


def test_async_client(server: ServerProcess) -> None:
    async def go() -> None:
        async with aioclient.InferenceServerClient(server.url) as c:
            assert await c.is_server_ready()
            assert (await c.get_model_metadata("strings"))["name"] == "strings"
            data = np.array([[b"abc", b"xyz"]], dtype=np.object_)
            i = aioclient.InferInput("INPUT0", [1, 2], "BYTES")
            i.set_data_from_numpy(data)
            r = await c.infer("strings", [i])
            assert r.as_numpy("OUTPUT0").tolist() == [[b"ABC", b"XYZ"]]
            assert r.as_numpy("OUTPUT1").tolist() == [[3, 3]]

    asyncio.run(go())
