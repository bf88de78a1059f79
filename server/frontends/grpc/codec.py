"""``ModelInferRequest`` / ``ModelInferResponse`` <-> ``InferRequest`` / ``InferResult``.

Placement rules as Triton's: each input without a shared-memory region takes either its
typed ``contents`` or the next entry of ``raw_input_contents`` (never both kinds in one
request); the response carries one ``raw_output_contents`` entry per output, in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.proto import dtypes
from shoal.proto.errors import InvalidInput
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server.classification import class_count
from shoal.server.shmkeys import shm_params
from shoal.server.types import Buffer, InferRequest, InferResult, InputTensor, RequestedOutput
from shoal.server.validation import version_number

# typed-contents field and the numpy type it is read with, per datatype
_CONTENTS: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", None),
}
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
            raise InvalidInput(
                "parameter keys starting with 'triton_' are reserved for Triton usage. Only the following keys "
                "starting with 'triton_' are allowed: " + " ".join(sorted(ALLOWED_TRITON_PARAMETERS))
            )
    return out


def decode_request(req: pb.ModelInferRequest) -> InferRequest:
    version = version_number(req.model_version)
    raw = req.raw_input_contents
    raw_next = 0
    inputs: list[InputTensor] = []
    for t in req.inputs:
        name = t.name
        dt = dtypes.BY_PROTOCOL.get(t.datatype)
        if dt is None:
            raise InvalidInput(f"input '{name}' has invalid datatype '{t.datatype}'")
        shape = tuple(t.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}' has a negative dimension in shape {list(shape)}")
        params = param_values(t.parameters)
        ref = shm_params(params, f"input '{name}'")
        data: Buffer
        if ref is not None:
            if t.HasField("contents"):
                raise InvalidInput(f"input '{name}' has both shared memory parameters and contents")
            inputs.append(
                InputTensor(name=name, datatype=t.datatype, shape=shape, data=b"", parameters=params, shm=ref)
            )
            continue
        if t.HasField("contents"):
            if len(raw):
                raise InvalidInput(
                    f"input '{name}': contents field must not be specified when using raw_input_contents"
                )
            data = _contents_bytes(t.contents, name, dt, dtypes.element_count(shape))
        else:
            if raw_next >= len(raw):
                raise InvalidInput(f"unable to find data for input tensor '{name}'")
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
            oparams = param_values(o.parameters)
            class_count(oparams, f"output '{o.name}'")
            oref = shm_params(oparams, f"output '{o.name}'")
            outputs.append(RequestedOutput(name=o.name, parameters=oparams, shm=oref))
    return InferRequest(
        model_name=req.model_name,
        model_version=version,
        inputs=inputs,
        outputs=outputs,
        id=req.id,
        parameters=_request_params(req.parameters),
    )


def _contents_bytes(contents: pb.InferTensorContents, name: str, dt: dtypes.DType, count: int) -> bytes:
    entry = _CONTENTS.get(dt.protocol)
    if entry is None:
        raise InvalidInput(
            f"input '{name}': {dt.protocol} data cannot be sent in typed contents; use raw_input_contents"
        )
    field, wide = entry
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input '{name}' has {len(values)} elements in contents.{field} but its shape needs {count}")
    if dt.protocol == "BYTES":
        return dtypes.serialize_bytes(np.array(list(values), dtype=np.object_))
    arr = np.array(values, dtype=wide)
    assert dt.numpy is not None
    if arr.dtype != dt.numpy and arr.size:
        info = np.iinfo(dt.numpy)  # type: ignore[type-var]  # only integer types narrow here
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input '{name}': a value in contents.{field} is out of range for {dt.protocol}")
    return arr.astype(dt.numpy).tobytes()


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
