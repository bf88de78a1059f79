"""Checking an inference request against a model version's configuration (names,
datatypes, shapes, byte sizes), for client requests and ensemble steps alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.proto import dtypes
from shoal.proto.errors import InvalidInput
from shoal.server.types import InferRequest

if TYPE_CHECKING:
    from shoal.server.models import ModelVersion, TensorSpec


_MAX_VERSION_DIGITS = 18


def version_number(text: str) -> int:
    """A model version as clients write it ("" or "-1": the version policy chooses, -1);
    raises ``InvalidInput`` for anything but up to 18 ASCII digits."""
    if not text:
        return -1
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_VERSION_DIGITS):
        raise InvalidInput(f"model version '{text[:32]}' is not a number")
    return int(text)


def validate(mv: ModelVersion, request: InferRequest) -> None:
    """Check names, datatypes, shapes and byte sizes against the configuration; errors name
    the tensor. Applies ``reshape`` so workers see the shapes the model expects."""
    name = mv.name
    max_batch = mv.config.max_batch_size
    batch_size: int | None = None
    seen: set[str] = set()
    for t in request.inputs:
        spec = mv.inputs.get(t.name)
        if spec is None:
            raise InvalidInput(f"unexpected inference input '{t.name}' for model '{name}'")
        if t.name in seen:
            raise InvalidInput(f"input '{t.name}' appears more than once in the request for model '{name}'")
        seen.add(t.name)
        if t.datatype != spec.datatype:
            raise InvalidInput(
                f"inference input '{t.name}' data-type is '{t.datatype}', but model '{name}' expects '{spec.datatype}'"
            )
        shape = t.shape
        if any(d < 0 for d in shape):
            raise InvalidInput(f"inference input '{t.name}' has a negative dimension in shape {list(shape)}")
        dims = shape
        if max_batch > 0:
            if not shape:
                raise InvalidInput(f"inference input '{t.name}' of batching model '{name}' needs a batch dimension")
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidInput(
                    f"inference input '{t.name}' batch size {shape[0]} differs from other inputs ({batch_size})"
                )
            if shape[0] > max_batch:
                raise InvalidInput(
                    f"inference request batch-size must be <= {max_batch} for '{name}', "
                    f"got {shape[0]} for input '{t.name}'"
                )
            dims = shape[1:]
        if not _dims_match(dims, spec.dims):
            expect = ([-1] if max_batch > 0 else []) + list(spec.dims)
            raise InvalidInput(
                f"unexpected shape for input '{t.name}' for model '{name}'. Expected {expect}, got {list(shape)}"
            )
        if spec.datatype != "BYTES":
            expected = dtypes.element_count(shape) * dtypes.BY_PROTOCOL[spec.datatype].itemsize
            if t.nbytes != expected:
                raise InvalidInput(
                    f"input byte size mismatch for input '{t.name}' for model '{name}'. "
                    f"Expected {expected}, got {t.nbytes}"
                )
        elif t.nbytes < 4 * dtypes.element_count(shape):
            # each element carries a 4-byte length: fewer bytes cannot hold the shape (the
            # worker checks the elements themselves)
            raise InvalidInput(
                f"expected {dtypes.element_count(shape)} string elements for inference input '{t.name}' "
                f"for model '{name}', but its {t.nbytes} bytes hold at most {t.nbytes // 4}"
            )
        if spec.reshape is not None:
            t.shape = ((shape[0],) if max_batch > 0 else ()) + _reshape(spec, dims)
    if batch_size is not None:
        request.batch_size = batch_size
    if len(seen) < mv.required_inputs or any(n not in seen for n, s in mv.inputs.items() if not s.optional):
        missing = [n for n, s in mv.inputs.items() if not s.optional and n not in seen]
        raise InvalidInput(
            f"expected {mv.required_inputs} inputs but got {len(seen)} inputs for model '{name}'. "
            f"Missing: {', '.join(repr(m) for m in missing)}"
        )
    if request.outputs is not None:
        for o in request.outputs:
            if o.name not in mv.outputs:
                raise InvalidInput(f"unexpected inference output '{o.name}' for model '{name}'")


def _dims_match(dims: tuple[int, ...], expect: tuple[int, ...]) -> bool:
    if len(dims) != len(expect):
        return False
    return all(e == -1 or d == e for d, e in zip(dims, expect, strict=True))


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
