"""``ModelInferRequest`` / ``ModelInferResponse`` <-> ``InferRequest`` / ``InferResult``.

Placement rules as Triton's: each input without a shared-memory region takes either its
typed ``contents`` or the next entry of ``raw_input_contents`` (never both kinds in one
request); the response carries one ``raw_output_contents`` entry per output, in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server.classification import class_count
from shoal.server.shmkeys import shm_params
from shoal.server.types import Buffer, InferRequest, InferResult, InputTensor, RequestedOutput
from shoal.server.validation import version_number

# typed-contents fields in the order Triton reads them, with the numpy type each is read
# in and the datatypes it can carry (the first is the one Triton reports for a mismatch)
_FIELDS: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("bool_contents", np.bool_, ("BOOL",)),
    ("int_contents", np.int32, ("INT32", "INT8", "INT16")),
    ("int64_contents", np.int64, ("INT64",)),
    ("uint_contents", np.uint32, ("UINT32", "UINT8", "UINT16")),
    ("uint64_contents", np.uint64, ("UINT64",)),
    ("fp32_contents", np.float32, ("FP32",)),
    ("fp64_contents", np.float64, ("FP64",)),
    ("bytes_contents", None, ("BYTES",)),
)
_CONTENTS: dict[str, tuple[str, Any]] = {dt: (f, wide) for f, wide, carries in _FIELDS for dt in carries}
"""Each datatype's typed-contents field and the numpy type it is read in."""
ALLOWED_TRITON_PARAMETERS = frozenset({"triton_enable_empty_final_response"})


def param_values(params: Any) -> dict[str, Any]:
    """A map of ``InferParameter`` (or ``LogSettings`` values: the same ``parameter_choice``
    oneof) as plain values; an unset value is ``None``."""
    out = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(p, which)
    return out


def set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _request_params(m: Any) -> dict[str, Any]:
    """A request's parameters; keys starting with ``triton_`` are Triton's (its rule and text)."""
    out = param_values(m)
    for k in out:
        if k.startswith("triton_") and k not in ALLOWED_TRITON_PARAMETERS:
            raise T.GRPC_TRITON_PARAMETER(allowed=" ".join(sorted(ALLOWED_TRITON_PARAMETERS)))
    return out


def decode_request(req: pb.ModelInferRequest) -> InferRequest:
    """The request, refused with Triton's texts where Triton refuses it here. A datatype
    this server does not know and negative dimensions pass: validation refuses them,
    naming the model's expectation, as Triton does."""
    version = version_number(req.model_version)
    model = req.model_name
    raw = req.raw_input_contents
    raw_next = 0
    inputs: list[InputTensor] = []
    for t in req.inputs:
        name = t.name
        shape = tuple(t.shape)
        tparams = t.parameters
        # most inputs have no parameters: no map walk, no error text built
        params = param_values(tparams) if len(tparams) else {}
        ref = shm_params(params, f"input '{name}'") if params else None
        data: Buffer
        if ref is not None:
            if t.HasField("contents"):
                raise T.GRPC_CONTENTS_WITH_SHM(name=name, model=model)
            inputs.append(
                InputTensor(name=name, datatype=t.datatype, shape=shape, data=b"", parameters=params, shm=ref)
            )
            continue
        if t.HasField("contents"):
            if len(raw):
                raise T.GRPC_CONTENTS_WITH_RAW(name=name, model=model)
            data = _contents_bytes(t.contents, name, t.datatype, shape, model, req.id)
        else:
            if raw_next >= len(raw):
                raise T.GRPC_NO_DATA(name=name, model=model)
            data = raw[raw_next]
            raw_next += 1
        inputs.append(InputTensor(name=name, datatype=t.datatype, shape=shape, data=data, parameters=params))
    if raw_next != len(raw):
        raise InvalidInput(
            f"expected {raw_next} entries in raw_input_contents (one per input without contents), got {len(raw)}"
        )
    outputs = None
    if len(req.outputs):
        outputs = []
        for o in req.outputs:
            oparams = param_values(o.parameters) if len(o.parameters) else {}
            oref = None
            if oparams:
                class_count(oparams, f"output '{o.name}'")
                oref = shm_params(oparams, f"output '{o.name}'")
            outputs.append(RequestedOutput(name=o.name, parameters=oparams, shm=oref))
    return InferRequest(
        model_name=model,
        model_version=version,
        inputs=inputs,
        outputs=outputs,
        id=req.id,
        parameters=_request_params(req.parameters) if len(req.parameters) else {},
    )


def _contents_bytes(
    contents: pb.InferTensorContents, name: str, datatype: str, shape: tuple[int, ...], model: str, rid: str
) -> bytes:
    """The bytes of typed ``contents``: one field, of ``datatype`` (Triton's texts). Their
    count is not checked here: validation compares the byte size with the shape."""
    out: bytes | None = None
    for field, wide, carries in _FIELDS:
        values = getattr(contents, field)
        if not len(values):
            continue
        if out is not None:
            raise T.GRPC_CONTENTS_TWICE(name=name, model=model)
        if datatype not in carries:
            shown = datatype if datatype in dtypes.BY_PROTOCOL else T.INVALID_DATATYPE
            raise T.GRPC_CONTENTS_DATATYPE(name=name, model=model, got=carries[0], expected=shown)
        if wide is None:
            count = dtypes.element_count(shape) if all(d >= 0 for d in shape) else -1
            if count >= 0 and len(values) != count:
                text = T.STRING_COUNT_EXCEEDED if len(values) > count else T.STRING_COUNT
                got = count + 1 if len(values) > count else len(values)
                raise text(rid, expected=count, name=name, model=model, got=got)
            out = dtypes.serialize_bytes(np.array(list(values), dtype=np.object_))
            continue
        dt = dtypes.BY_PROTOCOL[datatype]
        assert dt.numpy is not None
        arr = np.array(values, dtype=wide)
        if arr.dtype != dt.numpy and arr.size:
            info = np.iinfo(dt.numpy)  # type: ignore[type-var]  # only integer types narrow here
            if arr.min() < info.min or arr.max() > info.max:
                raise InvalidInput(f"input '{name}': a value in contents.{field} is out of range for {datatype}")
        out = arr.astype(dt.numpy).tobytes()
    return out if out is not None else b""


def encode_response(result: InferResult, out: pb.ModelInferResponse) -> None:
    out.model_name = result.model_name
    out.model_version = str(result.model_version)
    if result.id:
        out.id = result.id
    for k, v in result.parameters.items():
        set_param(out.parameters[k], v)
    for t in result.outputs:
        o = out.outputs.add()
        o.name = t.name
        o.datatype = t.datatype
        o.shape.extend(t.shape)
        # one entry per output keeps clients' positional lookup right; empty for outputs
        # written into the client's shared memory
        out.raw_output_contents.append(b"" if t.in_shm else bytes(t.data))
