"""Checking an inference request against a model version's configuration (names,
datatypes, shapes, byte sizes), for client requests, ensemble steps and BLS calls alike: the
router, frontend processes (lanes) and workers (BLS calls over lanes) run this same code, so
a request gets the same error wherever it is checked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A config input/output in the form request validation needs."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool
    reshape: tuple[int, ...] | None


def tensor_specs(tensors: list[mc.ModelInput] | list[mc.ModelOutput]) -> dict[str, TensorSpec]:
    out = {}
    for t in tensors:
        reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
        out[t.name] = TensorSpec(
            name=t.name,
            datatype=dtypes.BY_CONFIG_NUMBER[t.data_type].protocol,
            dims=tuple(t.dims),
            optional=bool(getattr(t, "optional", False)),
            reshape=reshape,
        )
    return out


class Signature(Protocol):
    """What validation reads of a model version (the router's ``ModelVersion``)."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> mc.ModelConfig: ...
    @property
    def inputs(self) -> dict[str, TensorSpec]: ...
    @property
    def outputs(self) -> dict[str, TensorSpec]: ...
    @property
    def required_inputs(self) -> int: ...


@dataclass(slots=True)
class ConfigSignature:
    """A model version as validation reads it, made from its configuration alone (frontend
    processes and workers checking the requests they send over lanes)."""

    name: str
    version: int
    config: mc.ModelConfig
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    required_inputs: int = 0
    config_bytes: bytes = b""
    reshapes: bool = False
    """Some input has a ``reshape`` (validation may change a request's shapes)."""


def signature(name: str, version: int, config_bytes: bytes) -> ConfigSignature:
    config = mc.ModelConfig.FromString(config_bytes)
    sig = ConfigSignature(name, version, config, config_bytes=config_bytes)
    sig.inputs = tensor_specs(list(config.input))
    sig.outputs = tensor_specs(list(config.output))
    sig.required_inputs = sum(1 for t in sig.inputs.values() if not t.optional)
    sig.reshapes = any(t.reshape is not None for t in sig.inputs.values())
    return sig


class Tensor(Protocol):
    shape: tuple[int, ...]

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Request(Protocol):
    """What validation reads (and sets: ``batch_size``, reshaped input shapes) of a request."""

    batch_size: int

    @property
    def id(self) -> str: ...
    @property
    def inputs(self) -> Sequence[Tensor]: ...
    @property
    def outputs(self) -> Sequence[Named] | None: ...


def validate(mv: Signature, request: Request) -> None:
    """Check names, datatypes, shapes and byte sizes against the configuration, in the order
    and with the texts of Triton's ``InferenceRequest::Normalize`` (``proto.errortexts``).
    Applies ``reshape`` so workers see the shapes the model expects."""
    name = mv.name
    rid = request.id
    inputs = request.inputs
    if request.outputs is not None:
        for o in request.outputs:
            if o.name not in mv.outputs:
                raise T.UNEXPECTED_OUTPUT(name=o.name, model=name)
    seen: set[str] = set()
    for t in inputs:
        if t.name in seen:  # Triton refuses it while building the request, before any check
            raise T.DUPLICATE_INPUT(rid, name=t.name)
        seen.add(t.name)
    count = len(inputs)
    if count > len(mv.inputs) or count < mv.required_inputs:
        raise _count_error(mv, request)
    max_batch = mv.config.max_batch_size
    batch_size = 0
    if max_batch > 0:
        for t in inputs:
            if t.name not in mv.inputs:
                raise T.UNEXPECTED_INPUT(name=t.name, model=name)
            if not t.shape:
                raise T.NO_BATCH_DIMENSION(rid, name=t.name, model=name)
            if t.shape[0] < 0:
                raise T.WILDCARD_DIMENSION(rid, name=t.name, model=name, shape=T.dims(t.shape))
            if batch_size == 0:
                batch_size = t.shape[0]
            elif t.shape[0] != batch_size:
                raise T.BATCH_SIZE_MISMATCH(rid, name=t.name, model=name)
        if batch_size > max_batch:
            raise T.BATCH_TOO_LARGE(rid, max_batch_size=max_batch, model=name)
    for t in inputs:
        spec = mv.inputs.get(t.name)
        if spec is None:
            raise T.UNEXPECTED_INPUT(name=t.name, model=name)
        if t.datatype != spec.datatype:
            got = t.datatype if t.datatype in dtypes.BY_PROTOCOL else T.INVALID_DATATYPE
            raise T.INPUT_DATATYPE(rid, name=t.name, got=got, model=name, expected=spec.datatype)
        shape = t.shape
        dims = shape[1:] if max_batch > 0 else shape
        if not _dims_match(dims, spec.dims):
            if len(dims) == len(spec.dims) and _negative_first(dims, spec.dims):
                raise T.WILDCARD_DIMENSION(rid, name=t.name, model=name, shape=T.dims(shape))
            expect = ((-1,) if max_batch > 0 else ()) + spec.dims
            note = T.IMPLICIT_BATCH_NOTE if max_batch > 0 else ""
            raise T.INPUT_SHAPE(rid, name=t.name, model=name, expected=T.dims(expect), shape=T.dims(shape), note=note)
        if spec.datatype != "BYTES":
            expected = dtypes.element_count(shape) * dtypes.BY_PROTOCOL[spec.datatype].itemsize
            if t.nbytes != expected:
                raise T.INPUT_BYTE_SIZE(rid, name=t.name, model=name, expected=expected, got=t.nbytes)
        elif t.nbytes < 4 * dtypes.element_count(shape):
            # each element carries a 4-byte length: fewer bytes cannot hold the shape (the
            # worker checks the elements themselves); Triton counts the elements it finds
            raise InvalidInput(
                f"expected {dtypes.element_count(shape)} string elements for inference input '{t.name}' "
                f"for model '{name}', but its {t.nbytes} bytes hold at most {t.nbytes // 4}"
            )
        if spec.reshape is not None:
            t.shape = ((shape[0],) if max_batch > 0 else ()) + _reshape(spec, dims)
    if max_batch > 0 and inputs:
        request.batch_size = batch_size
    if count < len(mv.inputs) and any(n not in seen for n, s in mv.inputs.items() if not s.optional):
        # within the count Triton allows, yet a required input is missing (Triton lets the
        # backend fail it): the count's text names what is missing
        raise _count_error(mv, request)


def _count_error(mv: Signature, request: Request) -> InvalidInput:
    """Triton's ``ValidateRequestInputs`` text, quirks included: the inputs given in request
    order, the missing ones in configuration order, an empty missing list written ``]``."""
    given = {t.name for t in request.inputs}
    missing = [n for n, s in mv.inputs.items() if not s.optional and n not in given]
    missing_text = ("[" + ",".join(f"'{n}'" for n in missing) + "]") if missing else "]"
    given_text = "[" + ",".join(f"'{t.name}'" for t in request.inputs) + "]"
    fields = {"got": len(request.inputs), "model": mv.name, "given": given_text, "missing": missing_text}
    if len(mv.inputs) == mv.required_inputs:
        err = T.INPUT_COUNT(request.id, expected=len(mv.inputs), **fields)
    else:
        err = T.INPUT_COUNT_RANGE(request.id, required=mv.required_inputs, total=len(mv.inputs), **fields)
    assert isinstance(err, InvalidInput)
    return err


def _negative_first(dims: tuple[int, ...], expect: tuple[int, ...]) -> bool:
    """Triton's shape loop meets a dimension the client left unspecified (negative) before
    one that differs from the configuration."""
    for d, e in zip(dims, expect, strict=True):
        if d < 0:
            return True
        if e != -1 and d != e:
            return False
    return False


def _dims_match(dims: tuple[int, ...], expect: tuple[int, ...]) -> bool:
    if len(dims) != len(expect):
        return False
    for d, e in zip(dims, expect, strict=True):  # a loop, not all() over a generator: per input, per request
        if d < 0 or (e != -1 and d != e):
            return False
    return True


def _reshape(spec: TensorSpec, dims: tuple[int, ...]) -> tuple[int, ...]:
    target = spec.reshape or ()
    if -1 not in target:
        return target
    known = 1
    for d in target:
        if d != -1:
            known *= d
    total = dtypes.element_count(dims)
    return tuple(total // known if known and d == -1 else d for d in target)
