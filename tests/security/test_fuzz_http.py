"""Fuzzing of the HTTP infer route's decoding: the ``Inference-Header-Content-Length`` header,
model-aware and chaos JSON bodies with binary tails, random bytes, deep nesting and raw bodies,
each run through ``serve_http`` (decode, validate, echo, classify, encode) under ``bounded``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from shoal.proto.errors import InvalidInput, ServingError
from shoal.server.classification import classify
from shoal.server.frontends.http import codec as http_codec
from shoal.server.validation import validate
from tests.security.fuzz_requests import chaos_http_requests, http_requests
from tests.security.fuzz_values import HEADER_VALUES, item_size, length_prefixed
from tests.security.fuzzing import MODELS, RAW_MODELS, bounded, echo, fuzz, serve_http


@fuzz(400)
@given(value=HEADER_VALUES, body_len=st.one_of(st.integers(0, 64), st.integers(0, 2**40)))
@example(value=" 12 ", body_len=12)
@example(value="-0", body_len=0)
@example(value="1" * 400, body_len=2**40)
@example(value="١٢", body_len=100)  # non-ASCII digits: refused
def test_http_header_length(value: str | None, body_len: int) -> None:
    out = bounded(lambda: http_codec.parse_header_length(value, body_len), len(value or ""), "parse_header_length")
    if value is None:
        assert out is None
    elif not isinstance(out, ServingError):
        assert out == int(value.strip()) and 0 <= out <= body_len


@fuzz(700)
@given(case=http_requests())
def test_http_structured(case: tuple[str, bytes | bytearray, str | None]) -> None:
    model, body, header = case
    event(serve_http(body, header, MODELS[model]))


def _binary_case(model: str, obj: dict[str, Any], tail: bytes = b"") -> tuple[str, bytes, int]:
    head = json.dumps(obj).encode()
    return model, head + tail, len(head)


def _bin(name: str, datatype: str, shape: list[int], size: int = 0) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


@fuzz(500)
@given(case=chaos_http_requests())
# declared sizes far beyond what the body carries
@example(case=("fuzz_plain", b'{"inputs":[{"name":"S","datatype":"BYTES","shape":[1099511627776],"data":[]}]}', None))
@example(case=_binary_case("fuzz_plain", {"inputs": [_bin("S", "BYTES", [2**40], 8)]}, bytes(8)))
@example(case=_binary_case("fuzz_batching", {"inputs": [_bin("A", "FP32", [2**32, 2**32])]}))
# an empty batch with huge other dimensions passes validate and is answered
@example(
    case=_binary_case(
        "fuzz_batching",
        {"inputs": [_bin("A", "FP32", [0, 4]), _bin("B", "INT32", [0, 2**40, 2]), _bin("S", "BYTES", [0, 2**63 - 1])]},
    )
)
@example(
    case=_binary_case(
        "fuzz_plain",
        {
            "inputs": [
                {
                    "name": "X",
                    "datatype": "UINT8",
                    "shape": [2, 3],
                    "parameters": {
                        "shared_memory_region": "r",
                        "shared_memory_byte_size": 2**64 - 1,
                        "shared_memory_offset": 2**64 - 1,
                    },
                }
            ]
        },
    )
)
def test_http_chaos(case: tuple[str, bytes | bytearray, int | None]) -> None:
    model, body, header_len = case
    event(serve_http(body, None if header_len is None else str(header_len), MODELS[model]))


@fuzz(250)
@given(body=st.binary(max_size=300), model=st.sampled_from(sorted(MODELS)), data=st.data())
def test_http_random_bytes(body: bytes, model: str, data: st.DataObject) -> None:
    header = data.draw(st.one_of(st.none(), st.integers(0, len(body)).map(str)), label="header")
    event(serve_http(body, header, MODELS[model]))


@fuzz(60)
@given(depth=st.integers(0, 1100), leaf=st.sampled_from(["1, 2, 3, 4", "1", "[]", '"x"', "true"]))
@example(depth=65, leaf="1, 2, 3, 4")  # the deepest nesting decode_request accepts
@example(depth=66, leaf="1, 2, 3, 4")
@example(depth=1024, leaf="1")
def test_http_deep_nesting(depth: int, leaf: str) -> None:
    data = "[" * depth + leaf + "]" * depth
    body = f'{{"inputs":[{{"name":"A","datatype":"FP32","shape":[1,4],"data":{data}}}]}}'.encode()
    event(serve_http(body, None, MODELS["fuzz_batching"]))


@fuzz(300)
@given(model=st.sampled_from(sorted(RAW_MODELS)), data=st.data())
def test_http_raw_body(model: str, data: st.DataObject) -> None:
    """The raw-body form (header length 0): the whole body is the one input."""
    mv = MODELS[model]
    spec = next(iter(mv.inputs.values()))
    if spec.datatype == "BYTES" and data.draw(st.booleans()):
        body = length_prefixed(data.draw(st.lists(st.binary(max_size=8), max_size=2)))
    else:
        size = data.draw(st.one_of(st.integers(0, 24).map(lambda n: n * item_size(spec.datatype)), st.integers(0, 64)))
        body = data.draw(st.binary(min_size=size, max_size=size))
    event(serve_http(bytearray(body) if data.draw(st.booleans()) else body, "0", mv))


# ---- bugs this fuzzer found (fixed; kept as regression tests) ------------------------------------


@pytest.mark.parametrize("value", ["--5", "--0", "-" * 3 + "1"])
def test_header_length_repeated_minus(value: str) -> None:
    # parse_header_length once accepted any number of leading '-', then int() raised ValueError
    # (HTTP 500 instead of 400)
    with pytest.raises(InvalidInput):
        http_codec.parse_header_length(value, 10)


def test_header_length_too_many_digits() -> None:
    # Python refuses int() of strings over sys.get_int_max_str_digits() (4300) digits; an
    # Inference-Header-Content-Length of 4301 zeros fits aiohttp's 8190-byte header limit
    with pytest.raises(InvalidInput):
        http_codec.parse_header_length("0" * 4301, 10)


def test_classification_of_empty_batch() -> None:
    # A batching model's request with batch size 0 passes validate(); classification of an
    # output of shape [0, 4] once called values.reshape(0, -1), which numpy refuses
    mv = MODELS["fuzz_batching"]
    head = json.dumps(
        {
            "inputs": [
                {"name": "A", "datatype": "FP32", "shape": [0, 4], "data": []},
                {"name": "B", "datatype": "INT32", "shape": [0, 1, 2], "data": []},
                {"name": "S", "datatype": "BYTES", "shape": [0, 1], "data": []},
            ],
            "outputs": [{"name": "A", "parameters": {"classification": 2}}],
        }
    ).encode()
    request = http_codec.decode_request(head, None, mv.name, 1)
    validate(mv, request)
    result = echo(request)
    assert result.outputs[0].shape == (0, 4)
    classify(request, result, mv.labels, batching=True)
    assert result.outputs[0].shape[0] == 0
