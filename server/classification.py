"""Triton's classification extension: an output requested with ``classification: N`` is
replaced by its top N entries as BYTES strings ``"<value>:<index>[:<label>]"`` (per batch
row for batching models), labels from the output's ``label_filename``."""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.server.types import InferRequest, InferResult, OutputTensor


def class_count(params: dict[str, Any], what: str) -> int | None:
    """The ``classification`` parameter of a requested output (``None``: not asked)."""
    if "classification" not in params:
        return None
    n = params["classification"]
    if type(n) is not int or n < 0:
        raise InvalidInput(f"{what}: 'classification' must be a non-negative integer")
    if n == 0:
        return None  # 0: no classification (tritonclient's default class_count)
    if "shared_memory_region" in params:
        raise T.OUTPUT_SHM_CLASSIFICATION()
    return n


def _format(value: Any, kind: str) -> str:
    return f"{float(value):f}" if kind == "f" else str(int(value))


def classify(request: InferRequest, result: InferResult, labels: dict[str, list[str]], batching: bool) -> None:
    """Replace the outputs asked for with classification by their top-N strings."""
    if request.outputs is None:
        return
    wanted = {o.name: n for o in request.outputs if (n := o.parameters.get("classification"))}
    if not wanted:
        return
    for i, t in enumerate(result.outputs):
        n = wanted.get(t.name)
        if n is None:
            continue
        dt = dtypes.by_protocol(t.datatype)
        if dt.numpy is None or dt.protocol in ("BYTES", "BOOL"):
            raise InvalidInput(f"output '{t.name}': classification needs a numeric output, not {t.datatype}")
        values = np.frombuffer(t.data, dtype=dt.numpy, count=dtypes.element_count(t.shape))
        batch = t.shape[0] if batching and t.shape else 1
        rows = values.reshape(batch, -1) if batch else values.reshape(0, 0)
        k = min(n, rows.shape[1])
        names = labels.get(t.name, [])
        kind = "f" if dt.numpy.kind == "f" else "i"
        out = np.empty((rows.shape[0], k), dtype=np.object_)
        for r, row in enumerate(rows):
            order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
            for j, idx in enumerate(order):
                text = f"{_format(row[idx], kind)}:{idx}"
                if idx < len(names):
                    text += f":{names[idx]}"
                out[r, j] = text.encode()
        shape = (rows.shape[0], k) if batching and t.shape else (k,)
        result.outputs[i] = OutputTensor(t.name, "BYTES", shape, dtypes.serialize_bytes(out.reshape(shape)))
