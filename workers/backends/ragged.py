"""Triton's ragged batching for backends that take one tensor per input (ONNX Runtime,
PyTorch, TensorRT): inputs with ``allow_ragged_batch`` are concatenated flat (the model takes
them as 1-D tensors, so requests of different lengths batch without padding); ``batch_input``
tensors the model needs to find each request in them are made from the batch; outputs named
by ``batch_output`` (``BATCH_SCATTER_WITH_INPUT_SHAPE``) are split back by each request's
source input shape. The Python backend hands requests to the model one by one and needs none
of this (as in Triton)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.proto.gen import model_config_pb2 as mc

Kind = mc.BatchInput.Kind


@dataclass(frozen=True, slots=True)
class Ragged:
    """What a model's configuration asks of ragged batching (``plan``: ``None`` if nothing)."""

    ragged: frozenset[str]
    batch_inputs: tuple[mc.BatchInput, ...]
    scatter: dict[str, str]
    """batch output name -> the source input whose shapes split it."""

    def model_inputs(self) -> list[str]:
        """Inputs of the model the batch makes (not in the configuration's ``input``)."""
        return [name for b in self.batch_inputs for name in b.target_name]

    def merge(self, requests: Sequence[Any]) -> dict[str, Any]:
        """The batched inputs of ``requests`` (``WorkRequest``s): ragged ones flattened and
        joined, the others joined along dimension 0, plus every batch input."""
        first = requests[0].inputs
        merged = {}
        for k in first:
            if k in self.ragged:
                merged[k] = np.concatenate([np.asarray(r.inputs[k]).reshape(-1) for r in requests])
            else:
                merged[k] = np.concatenate([r.inputs[k] for r in requests])
        for b in self.batch_inputs:
            value = _batch_input(b, requests)
            for name in b.target_name:
                merged[name] = value
        return merged

    def split(self, out: dict[str, Any], requests: Sequence[Any], sizes: list[int]) -> list[dict[str, Any]]:
        """Each request's part of the batch's outputs."""
        parts: list[dict[str, Any]] = [{} for _ in requests]
        for name, value in out.items():
            source = self.scatter.get(name)
            start = 0
            for i, (req, n) in enumerate(zip(requests, sizes, strict=True)):
                if source is None:
                    parts[i][name] = value[start : start + n]
                    start += n
                    continue
                shape = tuple(np.shape(req.inputs[source]))
                count = int(np.prod(shape))
                rest = tuple(value.shape[1:])
                parts[i][name] = value[start : start + count].reshape(shape + rest)
                start += count
        return parts


def plan(config: mc.ModelConfig) -> Ragged | None:
    ragged = frozenset(i.name for i in config.input if i.allow_ragged_batch)
    if config.max_batch_size <= 0 or not (ragged or config.batch_input or config.batch_output):
        return None
    scatter = {}
    for b in config.batch_output:
        if b.kind == mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE and b.source_input:
            for name in b.target_name:
                scatter[name] = b.source_input[0]
    return Ragged(ragged, tuple(config.batch_input), scatter)


def _batch_input(b: mc.BatchInput, requests: Sequence[Any]) -> np.ndarray:
    """As Triton's backends make it: element counts are of each request's whole source
    tensor; item shapes leave out the batch dimension and repeat per batch item."""
    dtype = np.float32 if b.data_type == mc.TYPE_FP32 else np.int32
    source = b.source_input[0] if b.source_input else ""
    shapes = [tuple(np.shape(r.inputs[source])) if source else (1,) for r in requests]
    counts = [int(np.prod(s)) for s in shapes]
    if b.kind == Kind.BATCH_ELEMENT_COUNT:
        return np.array(counts, dtype=dtype)
    if b.kind == Kind.BATCH_ACCUMULATED_ELEMENT_COUNT:
        return np.cumsum(counts).astype(dtype)
    if b.kind == Kind.BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO:
        return np.concatenate([[0], np.cumsum(counts)]).astype(dtype)
    if b.kind == Kind.BATCH_MAX_ELEMENT_COUNT_AS_SHAPE:
        # only its shape carries the information: [the largest element count]
        return np.zeros(max(counts, default=0), dtype=dtype)
    items = [s[1:] for s in shapes for _ in range(s[0] if s else 1)]
    rank = len(shapes[0]) - 1 if shapes and shapes[0] else 0
    if b.kind == Kind.BATCH_ITEM_SHAPE:
        return np.array(items, dtype=dtype).reshape(len(items), rank)
    if b.kind == Kind.BATCH_ITEM_SHAPE_FLATTEN:
        return np.array(items, dtype=dtype).reshape(-1)
    raise ValueError(f"unknown batch input kind {b.kind}")
