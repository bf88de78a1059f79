"""Checks of ``batch_input`` and ``batch_output`` in a model configuration (Triton's rules
and texts); the worker's backends make and split them (``workers/backends/ragged.py``)."""

from __future__ import annotations

from shoal.proto import errortexts as T
from shoal.proto.gen import model_config_pb2 as mc


def check(config: mc.ModelConfig) -> None:
    inputs = {i.name for i in config.input}
    for b in config.batch_input:
        kind = mc.BatchInput.Kind.Name(b.kind)
        if len(b.source_input) != 1:
            raise T.BATCH_IO_SOURCES(what="input", kind=kind, count=len(b.source_input))
        if b.data_type not in (mc.TYPE_INT32, mc.TYPE_FP32):
            raise T.BATCH_INPUT_DATATYPE()
        _sources(b.source_input, inputs)
    for o in config.batch_output:
        kind = mc.BatchOutput.Kind.Name(o.kind)
        if len(o.source_input) != 1:
            raise T.BATCH_IO_SOURCES(what="output", kind=kind, count=len(o.source_input))
        _sources(o.source_input, inputs)


def _sources(names: object, inputs: set[str]) -> None:
    for name in names:  # type: ignore[attr-defined]
        if name not in inputs:
            raise T.BATCH_IO_UNKNOWN_SOURCE(name=name)
