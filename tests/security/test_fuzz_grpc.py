"""Fuzzing of the gRPC ModelInfer decoding: model-aware and chaos ``ModelInferRequest`` messages
and raw message bytes (random or mutated serialized requests) parsed as the server's deserializer
does, each run through ``serve_grpc`` (decode, validate, echo, classify, encode) under ``bounded``."""

from __future__ import annotations

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from shoal.proto.errors import InvalidInput
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server.frontends.grpc import codec as grpc_codec
from shoal.server.frontends.grpc.app import _safe
from shoal.server.frontends.grpc.common import MALFORMED
from tests.security.fuzz_requests import chaos_grpc_requests, grpc_requests, mutated_messages
from tests.security.fuzzing import MODELS, TENSOR_MODELS, bounded, fuzz, serve_grpc


@fuzz(700)
@given(case=grpc_requests())
def test_grpc_structured(case: tuple[str, pb.ModelInferRequest]) -> None:
    model, msg = case
    event(serve_grpc(msg, MODELS[model]))


@fuzz(400)
@given(msg=chaos_grpc_requests(), model=st.sampled_from(TENSOR_MODELS))
def test_grpc_chaos(msg: pb.ModelInferRequest, model: str) -> None:
    event(serve_grpc(msg, MODELS[model]))


@fuzz(400)
@given(data=st.one_of(st.binary(max_size=256), mutated_messages()), model=st.sampled_from(TENSOR_MODELS))
@example(data=b"\x0a\xff\xff\xff\xff\x0f", model="fuzz_plain")  # a string field of 4 GB declared
@example(data=b"\x12\x02\xc3\x28", model="fuzz_plain")  # invalid UTF-8 in a string field
@example(data=b"\x0b" * 200, model="fuzz_plain")  # nested groups
def test_grpc_message_bytes(data: bytes, model: str) -> None:
    """Bytes off the wire, parsed as the server's deserializer does: a message or MALFORMED."""
    parse = _safe(pb.ModelInferRequest.FromString)
    msg = bounded(lambda: parse(data), len(data), "ModelInferRequest.FromString")
    if msg is MALFORMED:
        event("malformed")
        return
    assert isinstance(msg, pb.ModelInferRequest)
    event(serve_grpc(msg, MODELS[model]))


# ---- bugs this fuzzer found (fixed; kept as regression tests) ------------------------------------


@pytest.mark.parametrize("version", ["²", "1²", "①", "0" * 4301])
def test_grpc_model_version_digits_int_refuses(version: str) -> None:
    # str.isdigit() is true for superscripts and circled digits (Unicode No) and for 4301
    # digits, where int() raises ValueError: that was gRPC INTERNAL instead of INVALID_ARGUMENT
    with pytest.raises(InvalidInput):
        grpc_codec.decode_request(pb.ModelInferRequest(model_name="m", model_version=version))
