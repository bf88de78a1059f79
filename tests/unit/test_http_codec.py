"""KServe v2 HTTP body codec: JSON tensors, the binary tensor extension, raw bodies."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.server.frontends.http import codec
from shoal.server.types import InferRequest, InferResult, OutputTensor, RequestedOutput


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _decode(obj: Any, *blobs: bytes, binary: bool | None = None) -> InferRequest:
    """Decode ``obj`` as the JSON part, followed by ``blobs`` (binary form when any blob
    is given or ``binary`` is true)."""
    head = _json(obj)
    use_binary = bool(blobs) if binary is None else binary
    return codec.decode_request(head + b"".join(blobs), len(head) if use_binary else None, "m", 3)


def _one_input(**spec: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", **spec}]}


def _lp(*items: bytes) -> bytes:
    """Triton's BYTES serialization: 4-byte little-endian length + bytes, per element."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# ---- parse_header_length -------------------------------------------------------------------


def test_header_length_absent() -> None:
    assert codec.parse_header_length(None, 10) is None


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("7", 7), ("10", 10)])
def test_header_length_valid(value: str, expected: int) -> None:
    assert codec.parse_header_length(value, 10) == expected


@pytest.mark.parametrize("value", ["-1", "11", "1000000"])
def test_header_length_outside_body(value: str) -> None:
    with pytest.raises(InvalidInput, match="outside the body of 10 bytes"):
        codec.parse_header_length(value, 10)


@pytest.mark.parametrize("value", ["abc", "", "1.5", "0x10"])
def test_header_length_not_integer(value: str) -> None:
    with pytest.raises(InvalidInput, match="is not an integer") as ei:
        codec.parse_header_length(value, 10)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT


def test_header_length_error_truncates_long_value() -> None:
    with pytest.raises(InvalidInput) as ei:
        codec.parse_header_length("x" * 1000, 10)
    assert "x" * 33 not in ei.value.message


# ---- decode_request: JSON data of every datatype -------------------------------------------

# protocol datatype -> (JSON data, expected little-endian bytes); None: refused in JSON.
JSON_CASES: dict[str, tuple[list[Any], bytes] | None] = {
    "BOOL": ([True, False, True], bytes([1, 0, 1])),
    "UINT8": ([0, 7, 255], np.array([0, 7, 255], "<u1").tobytes()),
    "UINT16": ([0, 65535], np.array([0, 65535], "<u2").tobytes()),
    "UINT32": ([0, 2**32 - 1], np.array([0, 2**32 - 1], "<u4").tobytes()),
    "UINT64": ([0, 2**64 - 1], np.array([0, 2**64 - 1], "<u8").tobytes()),
    "INT8": ([-128, 127], np.array([-128, 127], "<i1").tobytes()),
    "INT16": ([-(2**15), 2**15 - 1], np.array([-(2**15), 2**15 - 1], "<i2").tobytes()),
    "INT32": ([-(2**31), 2**31 - 1], np.array([-(2**31), 2**31 - 1], "<i4").tobytes()),
    "INT64": ([-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], "<i8").tobytes()),
    "FP32": ([1.5, -2, 0.25], np.array([1.5, -2, 0.25], "<f4").tobytes()),
    "FP64": ([0.1, 3, -1e300], np.array([0.1, 3, -1e300], "<f8").tobytes()),
    "BYTES": (["abc", "", "h\u00e9"], _lp(b"abc", b"", "h\u00e9".encode())),
    "FP16": None,
    "BF16": None,
}


def test_json_cases_cover_every_datatype() -> None:
    assert set(JSON_CASES) == set(dtypes.BY_PROTOCOL)


@pytest.mark.parametrize("datatype", [k for k, v in JSON_CASES.items() if v is not None])
def test_json_data_flat(datatype: str) -> None:
    case = JSON_CASES[datatype]
    assert case is not None
    data, expected = case
    req = _decode(_one_input(datatype=datatype, shape=[len(data)], data=data))
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("x", datatype, (len(data),))
    assert bytes(t.data) == expected
    assert t.parameters == {}


@pytest.mark.parametrize("datatype", [k for k, v in JSON_CASES.items() if v is not None])
def test_json_data_nested_equals_flat(datatype: str) -> None:
    case = JSON_CASES[datatype]
    assert case is not None
    data, _ = case
    flat = data[:2]
    nested = [[flat[0]], [flat[1]]]
    a = _decode(_one_input(datatype=datatype, shape=[2, 1], data=flat)).inputs[0]
    b = _decode(_one_input(datatype=datatype, shape=[2, 1], data=nested)).inputs[0]
    assert bytes(a.data) == bytes(b.data)
    assert b.shape == (2, 1)


def test_json_data_deeply_nested_row_major() -> None:
    data = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    t = _decode(_one_input(datatype="INT32", shape=[2, 2, 2], data=data)).inputs[0]
    assert np.frombuffer(t.data, "<i4").tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_json_data_half_types_refused(datatype: str) -> None:
    with pytest.raises(InvalidInput, match=f"receiving {datatype} data via JSON is not supported"):
        _decode(_one_input(datatype=datatype, shape=[1], data=[1.0]))


@pytest.mark.parametrize("value", [1, 0, "true", None, 1.0])
def test_bool_requires_json_booleans(value: Any) -> None:
    with pytest.raises(InvalidInput, match="BOOL data must be JSON booleans"):
        _decode(_one_input(datatype="BOOL", shape=[2], data=[True, value]))


@pytest.mark.parametrize("datatype", ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"])
@pytest.mark.parametrize("value", [1.0, 1.5, True, "1", None])
def test_integer_types_reject_non_integers(datatype: str, value: Any) -> None:
    with pytest.raises(InvalidInput, match=f"{datatype} data must be JSON integers"):
        _decode(_one_input(datatype=datatype, shape=[2], data=[1, value]))


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("UINT8", 256), ("UINT8", -1), ("UINT64", 2**64), ("INT64", 2**63)],
)
def test_integer_out_of_range(datatype: str, value: int) -> None:
    # orjson reads integers beyond 64 bits as floats, which then fail the integer check
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}|{datatype} data must be JSON integers"):
        _decode(_one_input(datatype=datatype, shape=[1], data=[value]))


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("value", [True, "1.0", None])
def test_float_types_reject_non_numbers(datatype: str, value: Any) -> None:
    with pytest.raises(InvalidInput, match=f"{datatype} data must be JSON numbers"):
        _decode(_one_input(datatype=datatype, shape=[1], data=[value]))


@pytest.mark.parametrize("value", [True, False, "1.0", None, {"a": 1}])
def test_float_types_reject_a_non_number_among_numbers_nested_too(value: Any) -> None:
    """One bad element among numbers, in flat and in nested data (the element types are
    checked as a set: a bool is not a number there, though Python counts it an int)."""
    with pytest.raises(InvalidInput, match="FP32 data must be JSON numbers"):
        _decode(_one_input(datatype="FP32", shape=[3], data=[1.0, 2, value]))
    with pytest.raises(InvalidInput, match="FP32 data must be JSON numbers"):
        _decode(_one_input(datatype="FP32", shape=[3, 1], data=[[1.0], [2], [value]]))


@pytest.mark.parametrize("value", [1, 1.5, True, None, {"a": "b"}])
def test_bytes_require_json_strings(value: Any) -> None:
    with pytest.raises(InvalidInput, match="BYTES data must be JSON strings"):
        _decode(_one_input(datatype="BYTES", shape=[2], data=["a", value]))


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([3], [1, 2], "Failed to parse 'data' field: shape does not match true shape"),
        ([2], [1, 2, 3], "Unable to parse 'data': Shape does not match true shape of 'data' field"),
        ([2, 2], [[1, 2], [3]], "Failed to parse 'data' field: shape does not match true shape"),
        ([], [1, 2], "Unable to parse 'data': Shape does not match true shape of 'data' field"),
    ],
)
def test_json_element_count_must_match_shape(shape: list[int], data: list[Any], message: str) -> None:
    # Triton's texts (its code is INTERNAL; here a client's mistake is a 400)
    with pytest.raises(InvalidInput) as err:
        _decode(_one_input(datatype="INT32", shape=shape, data=data))
    assert err.value.message == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["a"], "expected 2 string elements for inference input 'x' for model 'm', got 1"),
        (
            ["a", "b", "c", "d"],
            "unexpected number of string elements 3 for inference input 'x' for model 'm', expecting 2",
        ),
    ],
)
def test_json_string_count_must_match_shape(data: list[str], message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        _decode(_one_input(datatype="BYTES", shape=[2], data=data))
    assert err.value.message == "[request id: <id_unknown>] " + message


def test_json_data_of_an_empty_tensor_is_not_read() -> None:
    assert bytes(_decode(_one_input(datatype="INT32", shape=[0], data=[1, 2])).inputs[0].data) == b""


def test_json_scalar_shape() -> None:
    t = _decode(_one_input(datatype="INT32", shape=[], data=[5])).inputs[0]
    assert t.shape == ()
    assert np.frombuffer(t.data, "<i4").tolist() == [5]


@pytest.mark.parametrize("datatype", ["INT32", "BYTES", "BOOL"])
def test_json_zero_elements(datatype: str) -> None:
    t = _decode(_one_input(datatype=datatype, shape=[2, 0], data=[[], []])).inputs[0]
    assert t.shape == (2, 0)
    assert bytes(t.data) == b""


def test_json_nesting_too_deep() -> None:
    data: Any = [1]
    for _ in range(70):
        data = [data]
    with pytest.raises(InvalidInput, match="nested too deeply"):
        _decode(_one_input(datatype="INT32", shape=[1], data=data))


# ---- decode_request: binary inputs ---------------------------------------------------------


def test_binary_inputs_in_order() -> None:
    a = np.arange(4, dtype="<f4").tobytes()
    b = np.array([7, 8], "<i8").tobytes()
    c = _lp(b"x", b"yz")
    obj = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": len(a)}},
            {"name": "j", "datatype": "INT32", "shape": [1], "data": [9]},
            {"name": "b", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": len(b)}},
            {"name": "c", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(c)}},
        ]
    }
    req = _decode(obj, a, b, c)
    assert [t.name for t in req.inputs] == ["a", "j", "b", "c"]
    assert [bytes(t.data) for t in req.inputs] == [a, np.array([9], "<i4").tobytes(), b, c]
    # binary_data_size is transport detail: not passed on as an input parameter
    assert all(t.parameters == {} for t in req.inputs)


def test_binary_input_is_a_view_not_a_copy() -> None:
    blob = b"\x01\x02\x03\x04"
    req = _decode(_one_input(datatype="UINT8", shape=[4], parameters={"binary_data_size": 4}), blob)
    assert isinstance(req.inputs[0].data, memoryview)


def test_binary_zero_size_input() -> None:
    blob = b"\x05"
    obj = {
        "inputs": [
            {"name": "empty", "datatype": "FP32", "shape": [0], "parameters": {"binary_data_size": 0}},
            {"name": "one", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}},
        ]
    }
    req = _decode(obj, blob)
    assert bytes(req.inputs[0].data) == b""
    assert bytes(req.inputs[1].data) == b"\x05"


def test_binary_only_zero_size_with_header() -> None:
    obj = _one_input(datatype="FP32", shape=[0], parameters={"binary_data_size": 0})
    req = _decode(obj, binary=True)
    assert bytes(req.inputs[0].data) == b""


def test_binary_too_few_bytes() -> None:
    obj = {
        "inputs": [
            {"name": "a", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}},
            {"name": "b", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}},
        ]
    }
    with pytest.raises(
        InvalidInput, match="^unexpected size for input 'b', expecting 1 additional bytes for model 'm'$"
    ):
        _decode(obj, b"\x00" * 5)


def test_binary_leftover_bytes() -> None:
    obj = _one_input(datatype="UINT8", shape=[2], parameters={"binary_data_size": 2})
    with pytest.raises(InvalidInput, match="^unexpected additional input data for model 'm'$"):
        _decode(obj, b"\x00" * 5)


def test_json_only_inputs_with_trailing_binary_refused() -> None:
    with pytest.raises(InvalidInput, match="^unexpected additional input data for model 'm'$"):
        _decode(_one_input(datatype="INT32", shape=[1], data=[1]), b"zz")


def test_binary_size_without_binary_body() -> None:
    obj = _one_input(datatype="UINT8", shape=[2], parameters={"binary_data_size": 2})
    # no Inference-Header-Content-Length: the whole body is JSON, so nothing follows it
    with pytest.raises(
        InvalidInput, match="^unexpected size for input 'x', expecting 2 additional bytes for model 'm'$"
    ):
        _decode(obj, binary=False)


@pytest.mark.parametrize("size", [-1, 1.0, "2", True])
def test_binary_size_must_be_non_negative_integer(size: Any) -> None:
    obj = _one_input(datatype="UINT8", shape=[2], parameters={"binary_data_size": size})
    with pytest.raises(InvalidInput, match="'binary_data_size' must be a non-negative integer"):
        _decode(obj, b"\x00\x00")


def test_input_parameters_other_than_binary_size_kept() -> None:
    obj = _one_input(datatype="UINT8", shape=[1], parameters={"binary_data_size": 1, "tag": "t"})
    assert _decode(obj, b"\x01").inputs[0].parameters == {"tag": "t"}


# ---- decode_request: malformed requests ----------------------------------------------------


def test_both_data_and_binary_size() -> None:
    obj = _one_input(datatype="UINT8", shape=[1], data=[1], parameters={"binary_data_size": 1})
    with pytest.raises(InvalidInput) as err:
        _decode(obj, b"\x01")
    assert err.value.message == (
        "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
        "'shared_memory_region' in 'parameters'. But set 'data' 'binary_data_size'"
    )


def test_neither_data_nor_binary_size() -> None:
    with pytest.raises(InvalidInput) as err:
        _decode(_one_input(datatype="UINT8", shape=[1]))
    assert err.value.message.endswith("'shared_memory_region' in 'parameters'. But no field is set")


def test_shared_memory_input_reference() -> None:
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 4, "shared_memory_offset": 8, "x": 1}
    req = _decode(_one_input(datatype="UINT8", shape=[4], parameters=params))
    t = req.inputs[0]
    assert t.shm is not None and (t.shm.region_name, t.shm.offset, t.shm.byte_size) == ("r", 8, 4)
    assert t.nbytes == 4 and len(t.data) == 0
    assert t.parameters == {"x": 1}  # the shared-memory parameters are consumed


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"shared_memory_region": "r"}, "'shared_memory_byte_size' is required"),
        ({"shared_memory_region": "", "shared_memory_byte_size": 4}, "non-empty string"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -4}, "unsigned 64-bit"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 4.0}, "unsigned 64-bit"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 4, "shared_memory_offset": 2**64}, "unsigned"),
    ],
)
def test_shared_memory_input_bad_reference(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _decode(_one_input(datatype="UINT8", shape=[4], parameters=params))


@pytest.mark.parametrize("datatype", ["FLOAT32", "fp32", "", "STRING"])
def test_invalid_datatype(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="^invalid datatype for input x$"):
        _decode(_one_input(datatype=datatype, shape=[1], data=[1]))


def test_invalid_datatype_of_binary_data_is_left_to_validation() -> None:
    # Triton names it in its datatype check, against the model's datatype
    t = _decode(_one_input(datatype="FLOAT", shape=[1], parameters={"binary_data_size": 4}), b"\x00" * 4).inputs[0]
    assert t.datatype == "FLOAT"


@pytest.mark.parametrize("datatype", [None, 5])
def test_missing_datatype(datatype: Any) -> None:
    with pytest.raises(InvalidInput, match="input 'x' has no 'datatype'"):
        _decode(_one_input(datatype=datatype, shape=[1], data=[1]))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.0], ["2"], [True], [[1]]])
def test_invalid_shape(shape: Any) -> None:
    message = "^Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer$"
    with pytest.raises(InvalidInput, match=message):
        _decode(_one_input(datatype="INT32", shape=shape, data=[1]))


@pytest.mark.parametrize("shape", [None, 3])
def test_shape_not_an_array(shape: Any) -> None:
    with pytest.raises(InvalidInput, match="must have a 'shape' of non-negative integers"):
        _decode(_one_input(datatype="INT32", shape=shape, data=[1]))


@pytest.mark.parametrize("body", [b"{", b"", b"{'inputs': []}", b"\xff\xfe", b"[1,"])
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="failed to parse the request JSON"):
        codec.decode_request(body, None, "m", 1)


def test_malformed_json_in_header_part() -> None:
    body = b'{"inputs": [' + b"\x00\x01"
    with pytest.raises(InvalidInput, match="failed to parse the request JSON"):
        codec.decode_request(body, 12, "m", 1)


@pytest.mark.parametrize("obj", [[], "inputs", 3, None])
def test_non_object_json(obj: Any) -> None:
    with pytest.raises(InvalidInput, match="must be an object"):
        _decode(obj)


@pytest.mark.parametrize("obj", [{}, {"inputs": {}}, {"inputs": None}, {"id": "a"}])
def test_missing_inputs(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="must have an 'inputs' array"):
        _decode(obj)


@pytest.mark.parametrize("inp", [1, "x", None, []])
def test_input_not_an_object(inp: Any) -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[0\] must be an object"):
        _decode({"inputs": [inp]})


@pytest.mark.parametrize("name", [None, "", 3])
def test_input_without_name(name: Any) -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[0\] has no 'name'"):
        _decode({"inputs": [{"name": name, "datatype": "INT32", "shape": [1], "data": [1]}]})


@pytest.mark.parametrize("request_id", [1, None, ["a"], {"a": 1}])
def test_request_id_must_be_string(request_id: Any) -> None:
    with pytest.raises(InvalidInput, match="request 'id' must be a string"):
        _decode({"id": request_id, "inputs": []})


@pytest.mark.parametrize("params", [[], "x", 1])
def test_request_parameters_must_be_object(params: Any) -> None:
    with pytest.raises(InvalidInput, match="request 'parameters' must be an object"):
        _decode({"inputs": [], "parameters": params})


def test_input_parameters_must_be_object() -> None:
    with pytest.raises(InvalidInput, match="input 'x' 'parameters' must be an object"):
        _decode(_one_input(datatype="INT32", shape=[1], data=[1], parameters=[1]))


def test_request_fields() -> None:
    req = _decode({"id": "r1", "parameters": {"binary_data_output": True}, "inputs": []})
    assert (req.model_name, req.model_version, req.id) == ("m", 3, "r1")
    assert req.parameters == {"binary_data_output": True}
    assert req.inputs == []
    assert req.outputs is None


def test_request_defaults() -> None:
    req = _decode({"inputs": []})
    assert req.id == ""
    assert req.parameters == {}
    assert req.outputs is None


# ---- decode_request: outputs ---------------------------------------------------------------


def test_outputs_parsed() -> None:
    req = _decode(
        {
            "inputs": [],
            "outputs": [
                {"name": "a"},
                {"name": "b", "parameters": {"binary_data": True}},
                {"name": "c", "parameters": {"binary_data": False, "classification": 0}},
            ],
        }
    )
    assert req.outputs == [
        RequestedOutput("a", {}),
        RequestedOutput("b", {"binary_data": True}),
        RequestedOutput("c", {"binary_data": False, "classification": 0}),
    ]


def test_outputs_empty_list() -> None:
    assert _decode({"inputs": [], "outputs": []}).outputs == []


@pytest.mark.parametrize("value", [1, "true", None, 0])
def test_output_binary_data_must_be_bool(value: Any) -> None:
    with pytest.raises(InvalidInput, match="output 'a': 'binary_data' must be a boolean"):
        _decode({"inputs": [], "outputs": [{"name": "a", "parameters": {"binary_data": value}}]})


def test_output_classification() -> None:
    req = _decode({"inputs": [], "outputs": [{"name": "a", "parameters": {"classification": 3}}]})
    assert req.outputs is not None and req.outputs[0].parameters == {"classification": 3}
    with pytest.raises(InvalidInput, match="output 'a': 'classification' must be a non-negative integer"):
        _decode({"inputs": [], "outputs": [{"name": "a", "parameters": {"classification": -3}}]})


def test_output_shared_memory_reference() -> None:
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 16}
    req = _decode({"inputs": [], "outputs": [{"name": "a", "parameters": params}]})
    assert req.outputs is not None
    ref = req.outputs[0].shm
    assert ref is not None and (ref.region_name, ref.offset, ref.byte_size) == ("r", 0, 16)


@pytest.mark.parametrize("outputs", [{}, "a", 1])
def test_outputs_must_be_array(outputs: Any) -> None:
    with pytest.raises(InvalidInput, match="request 'outputs' must be an array"):
        _decode({"inputs": [], "outputs": outputs})


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("a", r"outputs\[0\] must be an object"),
        ({}, r"outputs\[0\] has no 'name'"),
        ({"name": ""}, r"outputs\[0\] has no 'name'"),
        ({"name": "a", "parameters": []}, "output 'a' 'parameters' must be an object"),
    ],
)
def test_malformed_output(out: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _decode({"inputs": [], "outputs": [out]})


# ---- raw_request ---------------------------------------------------------------------------


def test_raw_request() -> None:
    body = np.arange(6, dtype="<f4").tobytes()
    req = codec.raw_request(body, "m", 2, "INPUT0", "FP32", (2, 3))
    assert (req.model_name, req.model_version) == ("m", 2)
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("INPUT0", "FP32", (2, 3))
    assert bytes(t.data) == body
    assert req.outputs is None
    assert req.parameters == {"binary_data_output": True}


def test_raw_request_empty_body() -> None:
    req = codec.raw_request(b"", "m", -1, "x", "UINT8", (0,))
    assert bytes(req.inputs[0].data) == b""


# ---- encode_result -------------------------------------------------------------------------


def _result(*outputs: OutputTensor, id: str = "", version: int = 1, **params: Any) -> InferResult:
    return InferResult(model_name="m", model_version=version, outputs=list(outputs), id=id, parameters=params)


def _request(outputs: list[RequestedOutput] | None = None, **params: Any) -> InferRequest:
    return InferRequest(model_name="m", model_version=-1, inputs=[], outputs=outputs, parameters=params)


def _out(name: str, datatype: str, values: Any, shape: tuple[int, ...] | None = None) -> OutputTensor:
    if datatype == "BYTES":
        data = _lp(*values)
        return OutputTensor(name, datatype, shape or (len(values),), data)
    arr = np.asarray(values, dtype=dtypes.BY_PROTOCOL[datatype].numpy)
    return OutputTensor(name, datatype, shape or arr.shape, arr.tobytes())


def _split(chunks: list[Any], header_len: int | None) -> tuple[dict[str, Any], bytes]:
    body = b"".join(bytes(c) for c in chunks)
    if header_len is None:
        return json.loads(body), b""
    return json.loads(body[:header_len]), body[header_len:]


# datatype -> (values, JSON values); None: refused as JSON
ENCODE_CASES: dict[str, tuple[list[Any], list[Any]] | None] = {
    "BOOL": ([True, False], [True, False]),
    "UINT8": ([0, 255], [0, 255]),
    "UINT16": ([1, 65535], [1, 65535]),
    "UINT32": ([1, 2**32 - 1], [1, 2**32 - 1]),
    "UINT64": ([1, 2**64 - 1], [1, 2**64 - 1]),
    "INT8": ([-128, 127], [-128, 127]),
    "INT16": ([-(2**15), 5], [-(2**15), 5]),
    "INT32": ([-(2**31), 5], [-(2**31), 5]),
    "INT64": ([-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
    "FP32": ([1.5, -0.25], [1.5, -0.25]),
    "FP64": ([0.1, -1e300], [0.1, -1e300]),
    "BYTES": ([b"abc", "h\u00e9".encode(), b""], ["abc", "h\u00e9", ""]),
    "FP16": None,
    "BF16": None,
}


def test_encode_cases_cover_every_datatype() -> None:
    assert set(ENCODE_CASES) == set(dtypes.BY_PROTOCOL)


@pytest.mark.parametrize("datatype", [k for k, v in ENCODE_CASES.items() if v is not None])
def test_encode_json_output(datatype: str) -> None:
    case = ENCODE_CASES[datatype]
    assert case is not None
    values, expected = case
    chunks, header_len = codec.encode_result(_request(), _result(_out("y", datatype, values)))
    assert header_len is None
    assert len(chunks) == 1
    resp, rest = _split(chunks, header_len)
    assert rest == b""
    assert resp["outputs"] == [{"name": "y", "datatype": datatype, "shape": [len(values)], "data": expected}]


def test_encode_json_output_is_flat_for_nd_shape() -> None:
    chunks, _ = codec.encode_result(_request(), _result(_out("y", "INT32", [[1, 2, 3], [4, 5, 6]])))
    resp, _ = _split(chunks, None)
    assert resp["outputs"][0]["shape"] == [2, 3]
    assert resp["outputs"][0]["data"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_encode_half_as_json_refused(datatype: str) -> None:
    out = OutputTensor("y", datatype, (2,), b"\x00" * 4)
    with pytest.raises(InvalidInput, match=f"output 'y': sending {datatype} data via JSON is not supported"):
        codec.encode_result(_request(), _result(out))


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_encode_half_as_binary(datatype: str) -> None:
    out = OutputTensor("y", datatype, (2,), b"\x01\x02\x03\x04")
    chunks, header_len = codec.encode_result(_request(binary_data_output=True), _result(out))
    resp, blobs = _split(chunks, header_len)
    assert resp["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert blobs == b"\x01\x02\x03\x04"


def test_encode_bytes_not_utf8_refused() -> None:
    out = _out("y", "BYTES", [b"ok", b"\xff\xfe"])
    with pytest.raises(InvalidInput, match="output 'y' holds bytes that are not UTF-8") as ei:
        codec.encode_result(_request(), _result(out))
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT


def test_encode_bytes_not_utf8_as_binary_ok() -> None:
    out = _out("y", "BYTES", [b"\xff\xfe"])
    chunks, header_len = codec.encode_result(_request(binary_data_output=True), _result(out))
    _, blobs = _split(chunks, header_len)
    assert blobs == _lp(b"\xff\xfe")


def test_encode_all_binary_default() -> None:
    a = _out("a", "FP32", [1.0, 2.0, 3.0])
    b = _out("b", "BYTES", [b"xy"])
    c = _out("c", "INT64", [7])
    chunks, header_len = codec.encode_result(_request(binary_data_output=True), _result(a, b, c))
    assert header_len == len(bytes(chunks[0]))
    resp, blobs = _split(chunks, header_len)
    assert [o["parameters"] for o in resp["outputs"]] == [
        {"binary_data_size": 12},
        {"binary_data_size": 6},
        {"binary_data_size": 8},
    ]
    assert all("data" not in o for o in resp["outputs"])
    assert blobs == bytes(a.data) + bytes(b.data) + bytes(c.data)


def test_encode_body_is_header_then_blobs_in_output_order() -> None:
    a = _out("a", "UINT8", [1, 2])
    b = _out("b", "UINT8", [3])
    c = _out("c", "UINT8", [4, 5, 6])
    req = _request(
        [
            RequestedOutput("c", {"binary_data": True}),
            RequestedOutput("a", {"binary_data": True}),
            RequestedOutput("b", {"binary_data": True}),
        ]
    )
    chunks, header_len = codec.encode_result(req, _result(a, b, c))
    resp, blobs = _split(chunks, header_len)
    assert [o["name"] for o in resp["outputs"]] == ["a", "b", "c"]
    assert blobs == bytes([1, 2, 3, 4, 5, 6])
    assert [bytes(x) for x in chunks[1:]] == [b"\x01\x02", b"\x03", b"\x04\x05\x06"]


def test_encode_per_output_binary_mixed_with_json() -> None:
    a = _out("a", "INT32", [1, 2])
    b = _out("b", "INT32", [3])
    req = _request([RequestedOutput("a"), RequestedOutput("b", {"binary_data": True})])
    chunks, header_len = codec.encode_result(req, _result(a, b))
    assert header_len is not None
    resp, blobs = _split(chunks, header_len)
    assert resp["outputs"][0] == {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}
    assert resp["outputs"][1] == {"name": "b", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 4}}
    assert blobs == bytes(b.data)


def test_encode_per_output_json_overrides_binary_default() -> None:
    a = _out("a", "INT32", [1])
    b = _out("b", "INT32", [2])
    req = _request([RequestedOutput("a", {"binary_data": False}), RequestedOutput("b")], binary_data_output=True)
    chunks, header_len = codec.encode_result(req, _result(a, b))
    resp, blobs = _split(chunks, header_len)
    assert resp["outputs"][0]["data"] == [1]
    assert resp["outputs"][1]["parameters"] == {"binary_data_size": 4}
    assert blobs == bytes(b.data)


def test_encode_all_outputs_json_when_every_binary_false() -> None:
    a = _out("a", "INT32", [1])
    req = _request([RequestedOutput("a", {"binary_data": False})], binary_data_output=True)
    chunks, header_len = codec.encode_result(req, _result(a))
    assert header_len is None
    assert _split(chunks, None)[0]["outputs"][0]["data"] == [1]


def test_encode_binary_data_output_must_be_true_bool() -> None:
    chunks, header_len = codec.encode_result(_request(binary_data_output="true"), _result(_out("a", "INT32", [1])))
    assert header_len is None


def test_encode_zero_size_binary_output_adds_no_bytes() -> None:
    empty = OutputTensor("e", "FP32", (0,), b"")
    a = _out("a", "UINT8", [9])
    chunks, header_len = codec.encode_result(_request(binary_data_output=True), _result(empty, a))
    resp, blobs = _split(chunks, header_len)
    assert resp["outputs"][0]["parameters"] == {"binary_data_size": 0}
    assert blobs == b"\x09"
    assert len(chunks) == 2


def test_encode_only_zero_size_binary_output() -> None:
    empty = OutputTensor("e", "FP32", (0, 3), b"")
    chunks, header_len = codec.encode_result(_request(binary_data_output=True), _result(empty))
    assert header_len == len(bytes(chunks[0]))
    assert len(chunks) == 1
    resp, blobs = _split(chunks, header_len)
    assert resp["outputs"][0] == {
        "name": "e",
        "datatype": "FP32",
        "shape": [0, 3],
        "parameters": {"binary_data_size": 0},
    }
    assert blobs == b""


def test_encode_binary_blob_is_not_copied() -> None:
    buf = memoryview(bytearray(b"\x01\x02\x03\x04"))
    out = OutputTensor("a", "UINT8", (4,), buf)
    chunks, _ = codec.encode_result(_request(binary_data_output=True), _result(out))
    assert chunks[1] is buf


def test_encode_id_only_when_set() -> None:
    chunks, _ = codec.encode_result(_request(), _result(id="req-7"))
    assert _split(chunks, None)[0]["id"] == "req-7"
    chunks, _ = codec.encode_result(_request(), _result())
    assert "id" not in _split(chunks, None)[0]


def test_encode_model_fields_and_version_string() -> None:
    chunks, header_len = codec.encode_result(_request(), _result(version=12))
    assert header_len is None
    resp = _split(chunks, None)[0]
    assert resp["model_name"] == "m"
    assert resp["model_version"] == "12"
    assert resp["outputs"] == []
    assert "parameters" not in resp


def test_encode_result_parameters() -> None:
    chunks, _ = codec.encode_result(_request(), _result(sequence_end=True))
    assert _split(chunks, None)[0]["parameters"] == {"sequence_end": True}


def test_encode_json_output_from_memoryview() -> None:
    data = memoryview(np.array([1.5, 2.5], "<f8").tobytes())
    chunks, _ = codec.encode_result(_request(), _result(OutputTensor("a", "FP64", (2,), data)))
    assert _split(chunks, None)[0]["outputs"][0]["data"] == [1.5, 2.5]


def test_encode_bytes_json_with_wrong_element_count_refused() -> None:
    out = OutputTensor("y", "BYTES", (3,), _lp(b"a"))
    with pytest.raises(InvalidInput, match="BYTES tensor 'y'"):
        codec.encode_result(_request(), _result(out))


def test_decode_encode_round_trip() -> None:
    data = [[1.0, 2.0], [3.0, 4.0]]
    req = _decode({"id": "x", "inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 2], "data": data}]})
    t = req.inputs[0]
    out = OutputTensor(t.name, t.datatype, t.shape, t.data)
    chunks, _ = codec.encode_result(req, _result(out, id=req.id))
    resp = _split(chunks, None)[0]
    assert resp["id"] == "x"
    assert resp["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_codec_errors_are_serving_errors() -> None:
    with pytest.raises(ServingError) as ei:
        _decode({"inputs": 1})
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT


def test_triton_parameter_keys_are_reserved_in_requests() -> None:
    """Triton's rule and text (HTTP); per-tensor parameters are not checked (nor by Triton)."""
    with pytest.raises(InvalidInput, match="parameter keys starting with 'triton_' are reserved for Triton usage"):
        _decode({"inputs": [], "parameters": {"triton_anything": 1}})
    req = _decode(
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.0], "parameters": {"triton_x": 1}}]}
    )
    assert req.inputs[0].parameters == {"triton_x": 1}


def test_triton_parameter_keys_are_reserved_in_grpc_requests() -> None:
    from shoal.proto.gen import grpc_service_pb2 as pb
    from shoal.server.frontends.grpc import codec as grpc_codec

    req = pb.ModelInferRequest(model_name="m")
    req.parameters["triton_secret"].bool_param = True
    with pytest.raises(InvalidInput, match="Only the following keys starting with 'triton_' are allowed"):
        grpc_codec.decode_request(req)
    ok = pb.ModelInferRequest(model_name="m")
    ok.parameters["triton_enable_empty_final_response"].bool_param = True
    assert grpc_codec.decode_request(ok).parameters == {"triton_enable_empty_final_response": True}
