"""Shared harness of the decoder fuzzers (``test_fuzz_http``, ``test_fuzz_grpc``, ``test_fuzz_bytes``):
property-based fuzzing (hypothesis) of what the server decodes from clients, the KServe v2 HTTP
body codec, the gRPC ``ModelInferRequest`` codec and its message parser, and the BYTES tensor
deserializer. Each decoded request then goes through ``validate`` against a real ``ModelVersion``,
an echo "model", classification and the response encoder (``serve_http``, ``serve_grpc``).

The property everywhere (``bounded``): an input is either accepted or refused with a
``ServingError`` whose code is a client error; never another exception, never a slow answer,
and never memory in proportion to a size that the input declares but does not carry.

Tests run derandomized and without an example database (``fuzz``), so a CI run is repeatable and
writes nothing into the repository. Their strategies are in ``fuzz_values`` and ``fuzz_requests``;
bugs the fuzzers found are kept as regression tests at the end of each test module.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar, cast

import orjson
from google.protobuf import text_format
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.classification import classify
from shoal.server.dataplane import DataPlane
from shoal.server.frontends.grpc import codec as grpc_codec
from shoal.server.frontends.http import codec as http_codec
from shoal.server.models import ModelVersion
from shoal.server.models.version import tensor_specs
from shoal.server.types import InferRequest, InferResult, OutputTensor
from shoal.server.validation import validate

T = TypeVar("T")

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # database=None keeps examples out of the repository; this keeps out the rest that
    # hypothesis caches (its unicode tables, constants found in the sources)
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "shoal-hypothesis")


def fuzz(examples: int) -> settings:
    """The settings of every fuzz test: ``examples`` examples, derandomized, no database."""
    return settings(
        max_examples=examples,
        deadline=None,  # time is bounded per call by ``bounded``, which is what matters here
        derandomize=True,
        database=None,
        # Examples build JSON bodies and protobuf messages of a few KB from many draws, which
        # hypothesis flags as slow generation or oversized data on a loaded CI machine; neither
        # says anything about the code under test.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- the property -----------------------------------------------------------------------------

CLIENT_ERRORS = frozenset(
    {ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND, ErrorCode.UNIMPLEMENTED, ErrorCode.RESOURCE_EXHAUSTED}
)
MAX_SECONDS = 5.0
"""Per call; the inputs here are at most a few KB, so any honest call takes milliseconds."""
MEMORY_BASE = 1 << 20
MEMORY_PER_INPUT_BYTE = 64
"""Peak traced memory of a call may be ``MEMORY_BASE`` plus this much per byte of input
(Python objects of parsed JSON are tens of bytes per input byte); a shape or size that the
input only declares (2**40 elements) must not count."""


def bounded(fn: Callable[[], T], size: int, what: str) -> T | ServingError:
    """``fn()``, or the client ``ServingError`` it raised. Any other exception propagates
    (the property fails); so does a call slower than ``MAX_SECONDS`` or one whose peak
    traced memory exceeds the budget for ``size`` bytes of input."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        out: T | ServingError = fn()
    except ServingError as exc:
        assert exc.code in CLIENT_ERRORS, f"{what}: {exc!r} is not a client error"
        assert isinstance(exc.message, str) and exc.message, f"{what}: {exc!r} has no message"
        out = exc
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
    assert elapsed < MAX_SECONDS, f"{what} took {elapsed:.2f} s for {size} bytes of input"
    budget = MEMORY_BASE + MEMORY_PER_INPUT_BYTE * size
    assert peak - base <= budget, f"{what} allocated {peak - base} bytes for {size} bytes of input"
    return out


# ---- models ------------------------------------------------------------------------------------

BATCHING = """
name: "fuzz_batching" backend: "python" max_batch_size: 8
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ -1, 2 ] },
  { name: "S" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "H" data_type: TYPE_FP16 dims: [ 2 ] optional: true },
  { name: "OPT" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "I16" data_type: TYPE_INT16 dims: [ -1 ] optional: true },
  { name: "U32" data_type: TYPE_UINT32 dims: [ 1 ] optional: true }
]
output [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" },
  { name: "B" data_type: TYPE_INT32 dims: [ -1, 2 ] },
  { name: "S" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "H" data_type: TYPE_FP16 dims: [ 2 ] },
  { name: "OPT" data_type: TYPE_BOOL dims: [ 1 ] },
  { name: "I16" data_type: TYPE_INT16 dims: [ -1 ] },
  { name: "U32" data_type: TYPE_UINT32 dims: [ 1 ] }
]
"""

PLAIN = """
name: "fuzz_plain" backend: "python" max_batch_size: 0
input [
  { name: "X" data_type: TYPE_UINT8 dims: [ 2, 3 ] },
  { name: "S" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "I64" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "R" data_type: TYPE_FP64 dims: [ 2, -1 ] reshape: { shape: [ -1 ] } },
  { name: "U16" data_type: TYPE_UINT16 dims: [ -1, -1 ] optional: true },
  { name: "BF" data_type: TYPE_BF16 dims: [ -1 ] optional: true },
  { name: "I8" data_type: TYPE_INT8 dims: [ 3 ] optional: true },
  { name: "U64" data_type: TYPE_UINT64 dims: [ -1 ] optional: true }
]
output [
  { name: "X" data_type: TYPE_UINT8 dims: [ 2, 3 ] },
  { name: "S" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "I64" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "R" data_type: TYPE_FP64 dims: [ -1 ] },
  { name: "U16" data_type: TYPE_UINT16 dims: [ -1, -1 ] },
  { name: "BF" data_type: TYPE_BF16 dims: [ -1 ] },
  { name: "I8" data_type: TYPE_INT8 dims: [ 3 ] },
  { name: "U64" data_type: TYPE_UINT64 dims: [ -1 ] }
]
"""

RAW_MODELS = {
    # models with one input, for the raw-body form (Inference-Header-Content-Length: 0)
    "raw_fp32": 'max_batch_size: 8 input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]',
    "raw_u8": 'max_batch_size: 0 input [ { name: "IN" data_type: TYPE_UINT8 dims: [ 2, -1 ] } ]',
    "raw_bytes": 'max_batch_size: 0 input [ { name: "IN" data_type: TYPE_STRING dims: [ 1 ] } ]',
    "raw_i16": 'max_batch_size: 4 input [ { name: "IN" data_type: TYPE_INT16 dims: [ 3 ] } ]',
    "raw_two_var": 'max_batch_size: 0 input [ { name: "IN" data_type: TYPE_FP64 dims: [ -1, -1 ] } ]',
}


def _model(text: str) -> ModelVersion:
    """A ModelVersion as ``ModelManager._new_version`` builds it."""
    config = text_format.Parse(text, mc.ModelConfig())
    mv = ModelVersion(name=config.name, version=1, config=config)
    mv.inputs = tensor_specs(list(config.input))
    mv.outputs = tensor_specs(list(config.output))
    mv.required_inputs = sum(1 for t in mv.inputs.values() if not t.optional)
    return mv


MODELS: dict[str, ModelVersion] = {
    mv.name: mv
    for mv in (
        _model(BATCHING),
        _model(PLAIN),
        *(
            _model(
                f'name: "{n}" backend: "python" {text} output [ {{ name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }} ]'
            )
            for n, text in RAW_MODELS.items()
        ),
    )
}
MODELS["fuzz_batching"].labels = {"A": ["zero", "one", "two"]}
TENSOR_MODELS = ("fuzz_batching", "fuzz_plain")


class _Models:
    def __init__(self, mv: ModelVersion) -> None:
        self.mv = mv

    def get(self, name: str, version: int = -1) -> ModelVersion:
        return self.mv


def _raw_input(mv: ModelVersion, nbytes: int) -> tuple[str, str, tuple[int, ...]]:
    """``DataPlane.raw_input`` (what the HTTP route asks for a raw body) over one model."""
    dataplane = cast(DataPlane, SimpleNamespace(registry=_Models(mv)))
    return DataPlane.raw_input(dataplane, mv.name, mv.version, nbytes)


# ---- the pipelines: decode, check, validate, "execute", classify, encode -------------------------


def _check_decoded(request: InferRequest, *, grpc: bool) -> None:
    assert isinstance(request, InferRequest)
    for t in request.inputs:
        assert isinstance(t.name, str) and (grpc or t.name)
        # an unknown datatype (binary data) and, from gRPC, negative dimensions reach
        # validation, which refuses them with Triton's texts (checked after it, in _serve)
        assert isinstance(t.datatype, str)
        assert all(type(d) is int and (grpc or d >= 0) for d in t.shape), t.shape
        assert isinstance(t.data, bytes | bytearray | memoryview)
        assert "binary_data_size" not in t.parameters or grpc
        assert not any(k.startswith("shared_memory_") for k in t.parameters), t.parameters
        if t.shm is not None:
            assert len(t.data) == 0 and isinstance(t.shm.region_name, str) and t.shm.region_name
            assert 0 <= t.shm.offset < 2**64 and 0 <= t.shm.byte_size < 2**64
    # request parameters only: per-tensor parameters are not checked (nor by Triton)
    assert not any(k.startswith("triton_") for k in request.parameters if k not in grpc_codec.ALLOWED_TRITON_PARAMETERS)
    for o in request.outputs or ():
        assert isinstance(o.name, str)
        assert not any(k.startswith("shared_memory_") for k in o.parameters), o.parameters


def echo(request: InferRequest) -> InferResult:
    """What an identity model answers: each input (not in shared memory) as the output of
    the same name, in the client's region where that output was asked there."""
    wanted = None if request.outputs is None else {o.name: o for o in request.outputs}
    outputs = []
    for t in request.inputs:
        if t.shm is not None:
            continue
        o = None if wanted is None else wanted.get(t.name)
        if wanted is not None and o is None:
            continue
        if o is not None and o.shm is not None:
            outputs.append(OutputTensor(t.name, t.datatype, t.shape, b"", in_shm=True, written=len(t.data)))
        else:
            outputs.append(OutputTensor(t.name, t.datatype, t.shape, t.data))
    return InferResult(
        model_name=request.model_name, model_version=max(request.model_version, 1), outputs=outputs, id=request.id
    )


def _serve(request: InferRequest, mv: ModelVersion, size: int, *, grpc: bool) -> str:
    """Validate, execute as an identity model, classify and encode; the stage reached."""
    checked = bounded(lambda: validate(mv, request), size, "validate")
    if isinstance(checked, ServingError):
        return "refused by validate"
    for t in request.inputs:
        assert t.datatype in dtypes.BY_PROTOCOL
        assert all(d >= 0 for d in t.shape), t.shape
    result = echo(request)
    batching = mv.config.max_batch_size > 0
    if request.outputs is not None:
        classified = bounded(lambda: classify(request, result, mv.labels, batching), size, "classify")
        if isinstance(classified, ServingError):
            return "refused by classify"
    if grpc:
        resp = pb.ModelInferResponse()
        encoded = bounded(lambda: grpc_codec.encode_response(result, resp), size, "encode_response")
        assert not isinstance(encoded, ServingError), encoded
        assert len(resp.raw_output_contents) == len(result.outputs)
        assert pb.ModelInferResponse.FromString(resp.SerializeToString()) == resp
        return "served"
    answer = bounded(lambda: http_codec.encode_result(request, result), size, "encode_result")
    if isinstance(answer, ServingError):
        return "refused by encode_result"
    chunks, json_len = answer
    head = orjson.loads(bytes(chunks[0]))
    assert [o["name"] for o in head["outputs"]] == [t.name for t in result.outputs]
    if json_len is None:
        assert len(chunks) == 1
    else:
        assert json_len == len(chunks[0])
        sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"] if "parameters" in o]
        assert sum(sizes) == sum(len(c) for c in chunks[1:])
    return "served"


def serve_http(body: bytes | bytearray, header: str | None, mv: ModelVersion) -> str:
    """What the HTTP infer route does with a body; the stage reached."""
    size = len(body) + len(header or "")
    parsed = bounded(lambda: http_codec.parse_header_length(header, len(body)), size, "parse_header_length")
    if isinstance(parsed, ServingError):
        return "refused by parse_header_length"
    header_len: int | None = parsed
    assert header_len is None or 0 <= header_len <= len(body)
    if header_len == 0:
        raw = bounded(lambda: _raw_input(mv, len(body)), size, "raw_input")
        if isinstance(raw, ServingError):
            return "refused by raw_input"
        request = http_codec.raw_request(body, mv.name, mv.version, *raw)
    else:
        decoded = bounded(lambda: http_codec.decode_request(body, header_len, mv.name, mv.version), size, "decode")
        if isinstance(decoded, ServingError):
            return "refused by decode_request"
        request = decoded
    _check_decoded(request, grpc=False)
    return _serve(request, mv, size, grpc=False)


def serve_grpc(msg: pb.ModelInferRequest, mv: ModelVersion) -> str:
    """What the gRPC ModelInfer service does with a parsed message; the stage reached."""
    size = msg.ByteSize()
    decoded = bounded(lambda: grpc_codec.decode_request(msg), size, "decode_request")
    if isinstance(decoded, ServingError):
        return "refused by decode_request"
    _check_decoded(decoded, grpc=True)
    return _serve(decoded, mv, size, grpc=True)
