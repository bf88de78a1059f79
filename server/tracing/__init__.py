"""Triton's trace extension: trace settings (global and per model, changed at run time over
HTTP and gRPC), sampling, and the trace output: Triton's JSON trace file (``triton`` mode) or
OpenTelemetry spans (``opentelemetry`` mode, when the ``opentelemetry`` packages are there).

Semantics follow Triton's ``server/src/tracer.cc`` (``TraceManager``): a model without a
setting of its own uses the global one; a model setting mirrors every field it does not set
from the global setting (and follows it when the global one changes); null / an empty value
clears a field. Each setting samples one request in ``rate`` while ``count`` (-1: no limit)
is not used up, and collects its traces: written to ``file`` as they finish when neither
``count`` nor ``log_frequency`` is set, otherwise to ``<file>.<n>`` every ``log_frequency``
traces and when ``count`` reaches 0 (and what is left when the setting is replaced or the
server stops: to ``<file>.<n>`` with a log frequency, to ``file`` without).

Timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, the clock of Triton's
``steady_clock``), one clock for every stamp. Compute timestamps come from the router's
send and reply times of the batch and the durations the worker measured (``InferDone``):
``COMPUTE_START`` = sent, ``COMPUTE_END`` = answered, and the worker's input and output
durations at either end with the transfer time split between them, so that
``COMPUTE_OUTPUT_START - COMPUTE_INPUT_END`` is the model's own execution time.

A request pays for tracing only when some setting can sample (``TraceManager.active``, one
attribute test in the frontends); its stages then test ``request.trace is None``. Files are
written by one thread (``_Writer``), never on the event loop.
"""

from shoal.server.tracing.manager import Trace, TraceManager, TraceTree
from shoal.server.tracing.options import (
    FILE_NOT_UPDATABLE,
    MODES,
    OPENTELEMETRY,
    TENSORS,
    TIMESTAMPS,
    TRITON,
    TraceConfigError,
    TraceOptions,
    parse_options,
)
from shoal.server.tracing.output import tensor_text
from shoal.server.tracing.settings import NewSetting, TraceSetting, from_grpc, from_json

__all__ = [
    "FILE_NOT_UPDATABLE",
    "MODES",
    "OPENTELEMETRY",
    "TENSORS",
    "TIMESTAMPS",
    "TRITON",
    "NewSetting",
    "Trace",
    "TraceConfigError",
    "TraceManager",
    "TraceOptions",
    "TraceSetting",
    "TraceTree",
    "from_grpc",
    "from_json",
    "parse_options",
    "tensor_text",
]
