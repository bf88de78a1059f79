"""Hypothesis strategies for whole requests: model-aware request plans (mostly valid, then
perturbed) rendered as HTTP bodies or gRPC ``ModelInferRequest`` messages, chaos requests (any
shape of input, mostly invalid), and serialized messages cut, overwritten or spliced."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from shoal.proto import dtypes
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server.frontends.grpc import codec as grpc_codec
from shoal.server.frontends.http import codec as http_codec
from shoal.server.models import ModelVersion
from tests.security.fuzz_values import (
    DATATYPES,
    DIMS,
    F32_MAX,
    HEADER_VALUES,
    I64,
    JSON,
    JSON_SCALARS,
    NAMES,
    PARAM_KEYS,
    PARAMS,
    REGIONS,
    SIZES,
    VERSIONS,
    binary_form,
    element_values,
    nested,
)
from tests.security.fuzzing import MODELS, TENSOR_MODELS

# ---- model-aware request plans (mostly valid, then perturbed) ----------------------------------

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
    values = draw(st.lists(element_values(spec.datatype), min_size=count, max_size=count))
    raw = binary_form(spec.datatype, values)
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
            t.values.append(draw(element_values(t.datatype)))
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


# ---- plans as HTTP requests --------------------------------------------------------------------


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
            d["data"] = nested(t.values, t.shape) if t.nest else t.values
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


# ---- plans as gRPC messages --------------------------------------------------------------------


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


# ---- chaos (any shape of input, mostly invalid) and mutated messages ---------------------------

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
