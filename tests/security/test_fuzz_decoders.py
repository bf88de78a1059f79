"""Property-based fuzzing (hypothesis) of what the server decodes from clients: the KServe v2
HTTP body codec, the gRPC ``ModelInferRequest`` codec and its message parser, and the BYTES
tensor deserializer; each decoded request then goes through ``validate`` against a real
``ModelVersion``, an echo "model", classification and the response encoder.

The property everywhere: an input is either accepted or refused with a ``ServingError`` whose
code is a client error (INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, RESOURCE_EXHAUSTED); never
another exception, never a slow answer, and never memory in proportion to a size that the
input declares but does not carry (every call runs under a time and a ``tracemalloc`` bound
scaled to the input's own size).

Runs derandomized and without an example database, so a CI run is repeatable and writes
nothing into the repository.

Bugs the fuzzer found are kept as regression tests at the end.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import numpy as np
import orjson
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from proto import dtypes
from proto.errors import ErrorCode, InvalidInput, ServingError
from proto.gen import grpc_service_pb2 as pb
from proto.gen import model_config_pb2 as mc
from server.classification import classify
from server.dataplane import DataPlane
from server.frontends.grpc import codec as grpc_codec
from server.frontends.grpc.app import _safe
from server.frontends.grpc.service import MALFORMED
from server.frontends.http import codec as http_codec
from server.models import ModelVersion, _tensor_specs
from server.types import InferRequest, InferResult, OutputTensor
from server.validation import validate

T = TypeVar("T")

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # database=None keeps examples out of the repository; this keeps out the rest that
    # hypothesis caches (its unicode tables, constants found in the sources)
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "shoal-hypothesis")


def _fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # time is bounded per call by _bounded, which is what matters here
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


def _bounded(fn: Callable[[], T], size: int, what: str) -> T | ServingError:
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
    mv.inputs = _tensor_specs(list(config.input))
    mv.outputs = _tensor_specs(list(config.output))
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
    dataplane = cast(DataPlane, SimpleNamespace(models=_Models(mv)))
    return DataPlane.raw_input(dataplane, mv.name, mv.version, nbytes)


# ---- the pipelines: decode, check, validate, "execute", classify, encode -------------------------


def _check_decoded(request: InferRequest, *, grpc: bool) -> None:
    assert isinstance(request, InferRequest)
    for t in request.inputs:
        assert isinstance(t.name, str) and (grpc or t.name)
        assert t.datatype in dtypes.BY_PROTOCOL
        assert all(type(d) is int and d >= 0 for d in t.shape), t.shape
        assert isinstance(t.data, bytes | bytearray | memoryview)
        assert "binary_data_size" not in t.parameters or grpc
        assert not any(k.startswith("shared_memory_") for k in t.parameters), t.parameters
        if t.shm is not None:
            assert len(t.data) == 0 and isinstance(t.shm.region_name, str) and t.shm.region_name
            assert 0 <= t.shm.offset < 2**64 and 0 <= t.shm.byte_size < 2**64
        if grpc:
            assert not any(
                k.startswith("triton_") for k in t.parameters if k not in grpc_codec.ALLOWED_TRITON_PARAMETERS
            )
    for o in request.outputs or ():
        assert isinstance(o.name, str)
        assert not any(k.startswith("shared_memory_") for k in o.parameters), o.parameters


def _echo(request: InferRequest) -> InferResult:
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
    checked = _bounded(lambda: validate(mv, request), size, "validate")
    if isinstance(checked, ServingError):
        return "refused by validate"
    result = _echo(request)
    batching = mv.config.max_batch_size > 0
    if request.outputs is not None:
        classified = _bounded(lambda: classify(request, result, mv.labels, batching), size, "classify")
        if isinstance(classified, ServingError):
            return "refused by classify"
    if grpc:
        resp = pb.ModelInferResponse()
        encoded = _bounded(lambda: grpc_codec.encode_response(result, resp), size, "encode_response")
        assert not isinstance(encoded, ServingError), encoded
        assert len(resp.raw_output_contents) == len(result.outputs)
        assert pb.ModelInferResponse.FromString(resp.SerializeToString()) == resp
        return "served"
    answer = _bounded(lambda: http_codec.encode_result(request, result), size, "encode_result")
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


def _http(body: bytes | bytearray, header: str | None, mv: ModelVersion) -> str:
    """What the HTTP infer route does with a body; the stage reached."""
    size = len(body) + len(header or "")
    parsed = _bounded(lambda: http_codec.parse_header_length(header, len(body)), size, "parse_header_length")
    if isinstance(parsed, ServingError):
        return "refused by parse_header_length"
    header_len: int | None = parsed
    assert header_len is None or 0 <= header_len <= len(body)
    if header_len == 0:
        raw = _bounded(lambda: _raw_input(mv, len(body)), size, "raw_input")
        if isinstance(raw, ServingError):
            return "refused by raw_input"
        request = http_codec.raw_request(body, mv.name, mv.version, *raw)
    else:
        decoded = _bounded(lambda: http_codec.decode_request(body, header_len, mv.name, mv.version), size, "decode")
        if isinstance(decoded, ServingError):
            return "refused by decode_request"
        request = decoded
    _check_decoded(request, grpc=False)
    return _serve(request, mv, size, grpc=False)


def _grpc(msg: pb.ModelInferRequest, mv: ModelVersion) -> str:
    """What the gRPC ModelInfer service does with a parsed message; the stage reached."""
    size = msg.ByteSize()
    decoded = _bounded(lambda: grpc_codec.decode_request(msg), size, "decode_request")
    if isinstance(decoded, ServingError):
        return "refused by decode_request"
    _check_decoded(decoded, grpc=True)
    return _serve(decoded, mv, size, grpc=True)


# ---- strategies: values ------------------------------------------------------------------------

PROTOCOLS = tuple(dtypes.BY_PROTOCOL)
F32_MAX = float(np.finfo(np.float32).max)
INVALID_DATATYPES = ("", "fp32", "FLOAT", "STRING", "TYPE_FP32", "INT128", "FP8", "BYTES ", "BOOL\x00", "İNT8")
DATATYPES = st.one_of(st.sampled_from(PROTOCOLS), st.sampled_from(INVALID_DATATYPES), st.text(max_size=6))
HUGE = (2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70)
NEGATIVE = (-1, -2, -(2**31), -(2**63), -(2**63) - 1)
DIMS = st.one_of(st.integers(0, 4), st.sampled_from(HUGE + NEGATIVE), st.integers(-(2**65), 2**65))
I64 = st.one_of(st.integers(0, 4), st.sampled_from((*HUGE[:7], *NEGATIVE[:4])), st.integers(-(2**63), 2**63 - 1))
NAMES = st.one_of(
    st.sampled_from(sorted({n for mv in MODELS.values() for n in mv.inputs}) + ["", "Z", "a" * 300, "A\x00", "ä"]),
    st.text(max_size=4),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=24,
)
SIZES = st.one_of(st.integers(0, 80), st.sampled_from(HUGE + NEGATIVE), st.booleans(), JSON_SCALARS)
REGIONS = st.one_of(st.sampled_from(["r0", "region", "", "/etc/passwd", "shoal_x", "a" * 300]), JSON_SCALARS)
PARAM_KEYS = (
    "binary_data_size",
    "binary_data",
    "binary_data_output",
    "classification",
    "shared_memory_region",
    "shared_memory_offset",
    "shared_memory_byte_size",
    "sequence_id",
    "sequence_start",
    "priority",
    "timeout",
    "triton_enable_empty_final_response",
    "triton_reserved",
    "custom",
)
PARAMS = st.dictionaries(
    st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=4)),
    st.one_of(SIZES, REGIONS, JSON_SCALARS),
    max_size=4,
)
"""Parameters of any of the kinds the decoders read, with values of any kind."""


def _itemsize(datatype: str) -> int:
    dt = dtypes.BY_PROTOCOL.get(datatype)
    return 1 if dt is None or dt.itemsize == 0 else dt.itemsize


def _elements(datatype: str) -> st.SearchStrategy[Any]:
    """Values a client would send for ``datatype``, in range."""
    dt = dtypes.BY_PROTOCOL.get(datatype)
    if dt is None:
        return st.integers(-3, 3)
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=6)
    if dt.numpy is not None and dt.numpy.kind in "iu":
        info = np.iinfo(dt.numpy)  # type: ignore[type-var]  # integer kinds only here
        return st.integers(int(info.min), int(info.max))
    if datatype in ("FP16", "BF16"):
        return st.floats(-65504.0, 65504.0, width=16)
    if datatype == "FP32":
        return st.floats(-F32_MAX, F32_MAX, width=32)
    return st.floats(allow_nan=False, allow_infinity=False)


def _to_bytes(datatype: str, values: list[Any]) -> bytes:
    """The binary form of ``values`` (what tritonclient sends)."""
    if datatype == "BYTES":
        return dtypes.serialize_bytes(np.array(values, dtype=np.object_))
    if datatype == "BF16":
        return np.array(values, dtype="<f4").view("<u2")[1::2].tobytes()
    dt = dtypes.BY_PROTOCOL.get(datatype)
    if dt is None or dt.numpy is None:
        return bytes(len(values))
    return np.array(values, dtype=dt.numpy).tobytes()


def _nested(values: list[Any], shape: list[int]) -> list[Any]:
    """``values`` nested as ``shape`` (row-major); flat when they do not fit it."""
    if len(shape) <= 1 or dtypes.element_count(shape) != len(values) or any(d < 0 or d > 64 for d in shape):
        return list(values)
    step = dtypes.element_count(shape[1:])
    return [_nested(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _lp(items: list[bytes]) -> bytes:
    """Triton's BYTES serialization: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# ---- strategies: model-aware request plans (mostly valid, then perturbed) -----------------------

_ABSENT: Any = object()


@dataclass
class TensorPlan:
    name: str
    datatype: str
    shape: list[int]
    values: list[Any]
    """The elements, for JSON ``data`` / typed ``contents``."""
    raw: bytes
    """The binary form, for ``binary_data_size`` / ``raw_input_contents``."""
    mode: str
    """Where the data goes: "data", "binary", "shm" or "both" (data and binary: refused)."""
    params: dict[str, Any] = field(default_factory=dict)
    nest: bool = False
    contents_field: str | None = None
    """gRPC: the typed field to fill (``None``: the one matching the datatype)."""


@dataclass
class RequestPlan:
    model: str
    inputs: list[TensorPlan]
    outputs: list[tuple[str, dict[str, Any]]] | None
    params: dict[str, Any]
    id: Any


@st.composite
def tensor_plans(draw: st.DrawFn, mv: ModelVersion, name: str, batch: int | None) -> TensorPlan:
    spec = mv.inputs[name]
    dims = [draw(st.integers(0, 3)) if d == -1 else d for d in spec.dims]
    shape = ([] if batch is None else [batch]) + dims
    count = dtypes.element_count(shape)
    values = draw(st.lists(_elements(spec.datatype), min_size=count, max_size=count))
    raw = _to_bytes(spec.datatype, values)
    if spec.datatype in http_codec.JSON_UNSUPPORTED:
        mode = draw(st.sampled_from(["binary", "binary", "binary", "shm", "data"]))
    else:
        mode = draw(st.sampled_from(["data", "data", "binary", "binary", "shm"]))
    params: dict[str, Any] = {}
    if mode == "shm":
        params["shared_memory_region"] = "r0"
        params["shared_memory_byte_size"] = len(raw)
        if draw(st.booleans()):
            params["shared_memory_offset"] = draw(st.integers(0, 64))
    return TensorPlan(spec.name, spec.datatype, shape, values, raw, mode, params, nest=draw(st.booleans()))


@st.composite
def output_params(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["none", "binary", "class", "none", "binary", "class", "shm", "chaos"]))
    if kind == "binary":
        return {"binary_data": draw(st.booleans())}
    if kind == "class":
        return {"classification": draw(st.integers(1, 4)), "binary_data": draw(st.booleans())}
    if kind == "shm":
        return {"shared_memory_region": "r1", "shared_memory_byte_size": draw(st.integers(0, 256))}
    if kind == "chaos":
        return draw(PARAMS)
    return {}


def _mutate(draw: st.DrawFn, plan: RequestPlan) -> None:
    """One perturbation a careless or hostile client makes."""
    what = draw(
        st.sampled_from(
            [
                "datatype",
                "dim",
                "shape",
                "count",
                "name",
                "duplicate",
                "drop",
                "garbage",
                "mode",
                "params",
                "field",
                "request",
            ]
        )
    )
    if what == "request":
        plan.params = draw(PARAMS)
        plan.id = draw(st.one_of(JSON_SCALARS, st.just(_ABSENT)))
        return
    if not plan.inputs:
        return
    i = draw(st.integers(0, len(plan.inputs) - 1))
    t = plan.inputs[i]
    if what == "datatype":
        t.datatype = draw(DATATYPES)
    elif what == "dim":
        if t.shape:
            t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(DIMS)
        else:
            t.shape.append(draw(DIMS))
    elif what == "shape":
        t.shape = draw(st.lists(DIMS, max_size=4))
    elif what == "count":
        shorter = draw(st.booleans())
        if t.values and shorter:
            t.values.pop()
            t.raw = t.raw[:-1]
        else:
            t.values.append(draw(_elements(t.datatype)))
            t.raw += draw(st.binary(min_size=1, max_size=4))
    elif what == "name":
        t.name = draw(NAMES)
    elif what == "duplicate":
        plan.inputs.append(TensorPlan(t.name, t.datatype, list(t.shape), list(t.values), t.raw, t.mode, dict(t.params)))
    elif what == "drop":
        del plan.inputs[i]
    elif what == "garbage":
        t.raw = draw(st.binary(max_size=len(t.raw) + 8))
        t.values = draw(st.lists(JSON_SCALARS, min_size=len(t.values), max_size=len(t.values) + 1))
    elif what == "mode":
        t.mode = draw(st.sampled_from(["data", "binary", "shm", "both", "none"]))
    elif what == "params":
        t.params.update(draw(PARAMS))
    elif what == "field":
        t.contents_field = draw(st.sampled_from(sorted({f for f, _ in grpc_codec._CONTENTS.values()})))


@st.composite
def request_plans(draw: st.DrawFn) -> RequestPlan:
    mv = MODELS[draw(st.sampled_from(TENSOR_MODELS))]
    max_batch = mv.config.max_batch_size
    batch = draw(st.integers(0, max_batch + 1)) if max_batch > 0 else None
    names = [n for n, s in mv.inputs.items() if not s.optional or draw(st.booleans())]
    inputs = [draw(tensor_plans(mv, n, batch)) for n in draw(st.permutations(names))]
    outputs: list[tuple[str, dict[str, Any]]] | None = None
    if draw(st.sampled_from([True, True, False])):
        out_names = draw(st.lists(st.sampled_from([*mv.outputs, "NOPE"]), min_size=1, max_size=4, unique=True))
        outputs = [(n, draw(output_params())) for n in out_names]
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["binary_data_output"] = draw(st.booleans())
    plan = RequestPlan(mv.name, inputs, outputs, params, draw(st.one_of(st.just(_ABSENT), st.text(max_size=8))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))):
        _mutate(draw, plan)
    return plan


DIGIT_STRINGS = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=12),
    # around the 4300-digit limit of int() on strings (sys.get_int_max_str_digits())
    st.integers(4290, 4310).map(lambda n: "1" * n),
)
INTEGER_LIKE = st.builds(
    lambda pad, sign, digits: pad + sign + digits + pad,
    st.sampled_from(["", " ", "\t", "\u2003"]),
    st.sampled_from(["", "-", "--", "+", "-+", "+-", "0x", "- "]),
    DIGIT_STRINGS,
)
"""Strings that look like integers to a quick check: signs, padding, very many digits."""
UNICODE_DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3)
"""Digits that are not ASCII: ``str.isdigit()`` is true for all, ``int()`` takes only ``Nd``."""
HEADER_VALUES = st.one_of(
    st.none(),
    INTEGER_LIKE,
    st.text(alphabet="-+0123456789 \t_x", max_size=8),
    st.integers(-(2**70), 2**70).map(str),
    UNICODE_DIGITS,
    st.text(max_size=6),
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, bytes | bytearray, str | None]:
    """A model-aware HTTP request: the model, the body and its header-length header."""
    plan = draw(request_plans())
    obj: dict[str, Any] = {}
    tail = b""
    inputs = []
    for t in plan.inputs:
        d: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        params = dict(t.params)
        if t.mode in ("data", "both"):
            d["data"] = _nested(t.values, t.shape) if t.nest else t.values
        if t.mode in ("binary", "both"):
            params["binary_data_size"] = len(t.raw)
            tail += t.raw
        if params:
            d["parameters"] = params
        inputs.append(d)
    obj["inputs"] = inputs
    if plan.outputs is not None:
        obj["outputs"] = [{"name": n, "parameters": p} if p else {"name": n} for n, p in plan.outputs]
    if plan.params:
        obj["parameters"] = plan.params
    if plan.id is not _ABSENT:
        obj["id"] = plan.id
    head = json.dumps(obj).encode()
    binary = any(t.mode in ("binary", "both") for t in plan.inputs)
    header: str | None = str(len(head)) if binary or draw(st.booleans()) else None
    chaos = draw(st.sampled_from(["none", "none", "none", "none", "header", "tail", "cut"]))
    if chaos == "header":
        header = draw(HEADER_VALUES)
    elif chaos == "tail":
        tail += draw(st.binary(min_size=1, max_size=16))
    elif chaos == "cut" and tail:
        tail = tail[: draw(st.integers(0, len(tail) - 1))]
    body = head + tail
    return plan.model, bytearray(body) if draw(st.booleans()) else body, header


def _param(p: pb.InferParameter, value: Any) -> None:
    """Set ``p`` to ``value`` in the kind a client would pick (left unset for ``None``)."""
    if value is None:
        return
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        p.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        p.uint64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value if isinstance(value, str) else json.dumps(value)


_FIELD_RANGE = {
    "int_contents": (-(2**31), 2**31 - 1),
    "int64_contents": (-(2**63), 2**63 - 1),
    "uint_contents": (0, 2**32 - 1),
    "uint64_contents": (0, 2**64 - 1),
}


def _fit(field_name: str, value: Any) -> Any:
    """``value`` as the typed-contents field ``field_name`` holds it (clamped to its range)."""
    if field_name == "bool_contents":
        return bool(value)
    if field_name == "bytes_contents":
        return value.encode() if isinstance(value, str) else str(value).encode()
    number = value if isinstance(value, int | float) else 0
    if field_name in ("fp32_contents", "fp64_contents"):
        return float(number)
    lo, hi = _FIELD_RANGE[field_name]
    n = int(number) if math.isfinite(number) else 0
    return min(max(n, lo), hi)


def _i64(d: int) -> int:
    return d if -(2**63) <= d < 2**63 else (2**63 - 1 if d > 0 else -(2**63))


VERSIONS = st.one_of(
    st.sampled_from(["", "", "1", "0", "-1", "01", "١٢", " 1", "1.0", "x", "18446744073709551616"]),
    INTEGER_LIKE,
    UNICODE_DIGITS,
    st.text(max_size=6),
)


@st.composite
def grpc_requests(draw: st.DrawFn) -> tuple[str, pb.ModelInferRequest]:
    """A model-aware ``ModelInferRequest``."""
    plan = draw(request_plans())
    msg = pb.ModelInferRequest(model_name=plan.model, model_version=draw(VERSIONS))
    if draw(st.sampled_from([True, True, True, False])):  # hypothesis favours the first entry
        msg.model_version = draw(st.sampled_from(["", "1", "7"]))
    if isinstance(plan.id, str):
        msg.id = plan.id
    # Triton's rule: typed contents and raw_input_contents never in one request; mostly keep to it
    if draw(st.sampled_from([True, True, True, False])):
        unsupported = any(t.datatype in http_codec.JSON_UNSUPPORTED for t in plan.inputs)
        uniform = "binary" if unsupported else draw(st.sampled_from(["data", "binary"]))
        for t in plan.inputs:
            if t.mode in ("data", "binary"):
                t.mode = uniform
    for t in plan.inputs:
        ti = msg.inputs.add(name=t.name, datatype=t.datatype, shape=[_i64(d) for d in t.shape])
        for k, v in t.params.items():
            _param(ti.parameters[k], v)
        if t.mode in ("data", "both"):
            entry = grpc_codec._CONTENTS.get(t.datatype)
            name = t.contents_field or (entry[0] if entry else "fp32_contents")
            getattr(ti.contents, name).extend(_fit(name, v) for v in t.values)
        if t.mode in ("binary", "both"):
            msg.raw_input_contents.append(t.raw)
    for n, params in plan.outputs or ():
        o = msg.outputs.add(name=n)
        for k, v in params.items():
            _param(o.parameters[k], v)
    for k, v in plan.params.items():
        _param(msg.parameters[k], v)
    if draw(st.sampled_from([False, False, False, False, False, True])):
        msg.raw_input_contents.append(draw(st.binary(max_size=16)))
    return plan.model, msg


# ---- strategies: chaos (any shape of input, mostly invalid) -------------------------------------

NESTED_DATA = st.recursive(
    st.one_of(st.integers(-(2**65), 2**65), st.floats(allow_nan=False), st.booleans(), st.text(max_size=3)),
    lambda kids: st.lists(kids, max_size=3),
    max_leaves=16,
)
CHAOS_INPUT = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(NAMES, JSON_SCALARS),
            "datatype": st.one_of(DATATYPES, JSON_SCALARS),
            "shape": st.one_of(st.lists(DIMS, max_size=4), JSON),
            "data": st.one_of(NESTED_DATA, JSON),
            "parameters": st.one_of(PARAMS, JSON),
        },
    ),
    JSON,
)
CHAOS_OUTPUT = st.one_of(
    st.fixed_dictionaries({}, optional={"name": st.one_of(NAMES, JSON_SCALARS), "parameters": st.one_of(PARAMS, JSON)}),
    JSON,
)
CHAOS_REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.one_of(st.lists(CHAOS_INPUT, max_size=4), JSON),
        "outputs": st.one_of(st.lists(CHAOS_OUTPUT, max_size=3), JSON),
        "parameters": st.one_of(PARAMS, JSON),
        "id": JSON,
    },
)


@st.composite
def chaos_http_requests(draw: st.DrawFn) -> tuple[str, bytes | bytearray, int | None]:
    """Any JSON object of request shape, a binary tail, and a header length in the body."""
    head = json.dumps(draw(st.one_of(CHAOS_REQUEST, JSON))).encode()
    tail = draw(st.binary(max_size=64))
    body = head + tail
    header_len = draw(st.one_of(st.none(), st.just(len(head)), st.integers(0, len(body))))
    return draw(st.sampled_from(sorted(MODELS))), bytearray(body) if draw(st.booleans()) else body, header_len


def _kinds(value_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[pb.InferParameter]:
    """An ``InferParameter`` of any kind: the natural one for a value, or another one."""

    @st.composite
    def build(draw: st.DrawFn) -> pb.InferParameter:
        p = pb.InferParameter()
        kind = draw(st.sampled_from(["natural", "bool", "int64", "uint64", "double", "string", "unset"]))
        if kind == "natural":
            _param(p, draw(value_strategy))
        elif kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "int64":
            p.int64_param = draw(I64)
        elif kind == "uint64":
            p.uint64_param = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)))
        elif kind == "double":
            p.double_param = draw(st.floats())
        elif kind == "string":
            p.string_param = draw(st.text(max_size=6))
        return p

    return build()


GRPC_PARAMS = st.dictionaries(
    st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=4)), _kinds(st.one_of(SIZES, REGIONS)), max_size=4
)
CONTENTS_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.one_of(
        st.floats(-F32_MAX, F32_MAX, width=32), st.sampled_from([math.inf, -math.inf, math.nan])
    ),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}


@st.composite
def chaos_grpc_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=8)), model_version=draw(VERSIONS), id=draw(st.text(max_size=8))
    )
    for k, p in draw(GRPC_PARAMS).items():
        msg.parameters[k].CopyFrom(p)
    for _ in range(draw(st.integers(0, 4))):
        t = msg.inputs.add(name=draw(NAMES), datatype=draw(DATATYPES), shape=draw(st.lists(I64, max_size=4)))
        for k, p in draw(GRPC_PARAMS).items():
            t.parameters[k].CopyFrom(p)
        if draw(st.booleans()):
            t.contents.SetInParent()  # present, possibly empty
            for name in draw(st.lists(st.sampled_from(sorted(CONTENTS_FIELDS)), max_size=2, unique=True)):
                getattr(t.contents, name).extend(draw(st.lists(CONTENTS_FIELDS[name], max_size=12)))
    for _ in range(draw(st.integers(0, 3))):
        o = msg.outputs.add(name=draw(st.text(max_size=4)))
        for k, p in draw(GRPC_PARAMS).items():
            o.parameters[k].CopyFrom(p)
    msg.raw_input_contents.extend(draw(st.lists(st.binary(max_size=32), max_size=5)))
    return msg


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """Serialized requests, then cut, overwritten, spliced or extended."""
    if draw(st.booleans()):
        data = draw(chaos_grpc_requests()).SerializeToString()
    else:
        data = draw(grpc_requests())[1].SerializeToString()
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["cut", "byte", "insert", "varint"]))
        at = draw(st.integers(0, len(data)))
        if how == "cut":
            data = data[:at]
        elif how == "byte" and at < len(data):
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif how == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        else:  # a huge length prefix
            data = data[:at] + b"\xff\xff\xff\xff\x0f" + data[at:]
    return data


# ---- HTTP --------------------------------------------------------------------------------------


@_fuzz(400)
@given(value=HEADER_VALUES, body_len=st.one_of(st.integers(0, 64), st.integers(0, 2**40)))
@example(value=" 12 ", body_len=12)
@example(value="-0", body_len=0)
@example(value="1" * 400, body_len=2**40)
@example(value="١٢", body_len=100)  # non-ASCII digits: refused
def test_http_header_length(value: str | None, body_len: int) -> None:
    out = _bounded(lambda: http_codec.parse_header_length(value, body_len), len(value or ""), "parse_header_length")
    if value is None:
        assert out is None
    elif not isinstance(out, ServingError):
        assert out == int(value.strip()) and 0 <= out <= body_len


@_fuzz(700)
@given(case=http_requests())
def test_http_structured(case: tuple[str, bytes | bytearray, str | None]) -> None:
    model, body, header = case
    event(_http(body, header, MODELS[model]))


def _binary_case(model: str, obj: dict[str, Any], tail: bytes = b"") -> tuple[str, bytes, int]:
    head = json.dumps(obj).encode()
    return model, head + tail, len(head)


def _bin(name: str, datatype: str, shape: list[int], size: int = 0) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


@_fuzz(500)
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
    event(_http(body, None if header_len is None else str(header_len), MODELS[model]))


@_fuzz(250)
@given(body=st.binary(max_size=300), model=st.sampled_from(sorted(MODELS)), data=st.data())
def test_http_random_bytes(body: bytes, model: str, data: st.DataObject) -> None:
    header = data.draw(st.one_of(st.none(), st.integers(0, len(body)).map(str)), label="header")
    event(_http(body, header, MODELS[model]))


@_fuzz(60)
@given(depth=st.integers(0, 1100), leaf=st.sampled_from(["1, 2, 3, 4", "1", "[]", '"x"', "true"]))
@example(depth=65, leaf="1, 2, 3, 4")  # the deepest nesting decode_request accepts
@example(depth=66, leaf="1, 2, 3, 4")
@example(depth=1024, leaf="1")
def test_http_deep_nesting(depth: int, leaf: str) -> None:
    data = "[" * depth + leaf + "]" * depth
    body = f'{{"inputs":[{{"name":"A","datatype":"FP32","shape":[1,4],"data":{data}}}]}}'.encode()
    event(_http(body, None, MODELS["fuzz_batching"]))


@_fuzz(300)
@given(model=st.sampled_from(sorted(RAW_MODELS)), data=st.data())
def test_http_raw_body(model: str, data: st.DataObject) -> None:
    """The raw-body form (header length 0): the whole body is the one input."""
    mv = MODELS[model]
    spec = next(iter(mv.inputs.values()))
    if spec.datatype == "BYTES" and data.draw(st.booleans()):
        body = _lp(data.draw(st.lists(st.binary(max_size=8), max_size=2)))
    else:
        size = data.draw(st.one_of(st.integers(0, 24).map(lambda n: n * _itemsize(spec.datatype)), st.integers(0, 64)))
        body = data.draw(st.binary(min_size=size, max_size=size))
    event(_http(bytearray(body) if data.draw(st.booleans()) else body, "0", mv))


# ---- gRPC --------------------------------------------------------------------------------------


@_fuzz(700)
@given(case=grpc_requests())
def test_grpc_structured(case: tuple[str, pb.ModelInferRequest]) -> None:
    model, msg = case
    event(_grpc(msg, MODELS[model]))


@_fuzz(400)
@given(msg=chaos_grpc_requests(), model=st.sampled_from(TENSOR_MODELS))
def test_grpc_chaos(msg: pb.ModelInferRequest, model: str) -> None:
    event(_grpc(msg, MODELS[model]))


@_fuzz(400)
@given(data=st.one_of(st.binary(max_size=256), mutated_messages()), model=st.sampled_from(TENSOR_MODELS))
@example(data=b"\x0a\xff\xff\xff\xff\x0f", model="fuzz_plain")  # a string field of 4 GB declared
@example(data=b"\x12\x02\xc3\x28", model="fuzz_plain")  # invalid UTF-8 in a string field
@example(data=b"\x0b" * 200, model="fuzz_plain")  # nested groups
def test_grpc_message_bytes(data: bytes, model: str) -> None:
    """Bytes off the wire, parsed as the server's deserializer does: a message or MALFORMED."""
    parse = _safe(pb.ModelInferRequest.FromString)
    msg = _bounded(lambda: parse(data), len(data), "ModelInferRequest.FromString")
    if msg is MALFORMED:
        event("malformed")
        return
    assert isinstance(msg, pb.ModelInferRequest)
    event(_grpc(msg, MODELS[model]))


# ---- BYTES deserialization ---------------------------------------------------------------------

COUNTS = st.one_of(st.integers(0, 8), st.sampled_from(HUGE[:-2]), st.integers(0, 2**40))


def _check_deserialize(buffer: bytes | bytearray | memoryview, count: int) -> None:
    out = _bounded(lambda: dtypes.deserialize_bytes(buffer, count, name="t"), len(buffer), "deserialize_bytes")
    if isinstance(out, ServingError):
        assert isinstance(out, InvalidInput)
        return
    assert out.shape == (count,) and out.dtype == np.object_
    assert all(type(b) is bytes for b in out.tolist())
    assert _lp(out.tolist()) == bytes(buffer)


@_fuzz(300)
@given(buffer=st.binary(max_size=128), count=COUNTS, kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
@example(buffer=b"", count=0, kind="bytes")
@example(buffer=b"\x00\x00\x00\x00", count=2**40, kind="bytes")
@example(buffer=b"\xff\xff\xff\xff" + bytes(12), count=4, kind="memoryview")
def test_deserialize_bytes_random(buffer: bytes, count: int, kind: str) -> None:
    buf: bytes | bytearray | memoryview = buffer
    if kind == "bytearray":
        buf = bytearray(buffer)
    elif kind == "memoryview":
        buf = memoryview(buffer)
    _check_deserialize(buf, count)


@_fuzz(300)
@given(
    items=st.lists(st.binary(max_size=12), max_size=12),
    delta=st.one_of(st.just(0), st.integers(-3, 3), st.sampled_from([2**31, 2**40])),
    cut=st.integers(0, 3),
    extra=st.binary(max_size=3),
)
def test_deserialize_bytes_well_formed(items: list[bytes], delta: int, cut: int, extra: bytes) -> None:
    """Well-formed buffers round-trip; a wrong count, a cut or trailing bytes are refused."""
    buffer = _lp(items)
    if delta == 0 and not extra and cut == 0:
        assert dtypes.deserialize_bytes(buffer, len(items)).tolist() == items
    damaged = (buffer[: len(buffer) - cut] if cut else buffer) + extra
    _check_deserialize(damaged, max(0, len(items) + delta))
    # the buffer as 32-bit words, as a worker's shared memory view may be typed
    words = np.frombuffer(buffer + bytes(-len(buffer) % 4), dtype="<u4")
    _check_deserialize(words.data, max(0, len(items) + delta))


@pytest.mark.parametrize("count", [2**20, 2**31, 2**40, 2**62, 2**63 - 1, 2**64])
@pytest.mark.parametrize("size", [0, 3, 4, 64, 4096])
def test_deserialize_bytes_huge_count_fails_fast(count: int, size: int) -> None:
    """A huge count with a short buffer is refused before ``count`` slots are allocated."""
    out = _bounded(lambda: dtypes.deserialize_bytes(bytes(size), count, name="t"), size, "deserialize_bytes")
    assert isinstance(out, InvalidInput)


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


@pytest.mark.parametrize("version", ["²", "1²", "①", "0" * 4301])
def test_grpc_model_version_digits_int_refuses(version: str) -> None:
    # str.isdigit() is true for superscripts and circled digits (Unicode No) and for 4301
    # digits, where int() raises ValueError: that was gRPC INTERNAL instead of INVALID_ARGUMENT
    with pytest.raises(InvalidInput):
        grpc_codec.decode_request(pb.ModelInferRequest(model_name="m", model_version=version))


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
    result = _echo(request)
    assert result.outputs[0].shape == (0, 4)
    classify(request, result, mv.labels, batching=True)
    assert result.outputs[0].shape[0] == 0


def test_deserialize_bytes_negative_count() -> None:
    # A negative count once reached np.empty(count) (ValueError). Not reachable from clients
    # (both decoders refuse negative dimensions), but the docstring promises InvalidInput.
    with pytest.raises(InvalidInput):
        dtypes.deserialize_bytes(b"", -1, name="t")
