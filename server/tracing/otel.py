"""Trace output in ``opentelemetry`` mode: Triton's spans, exported by the SDK's batch span
processor from its own thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.server.tracing.options import FRONTEND_STAMPS, OTEL_DEFAULT_URL, TraceOptions

if TYPE_CHECKING:
    from shoal.server.tracing.manager import Trace, TraceTree

log = logging.getLogger("shoal.trace")


# ---- OpenTelemetry ----------------------------------------------------------------------------


@dataclass(slots=True)
class _SpanPlan:
    name: str
    start: int
    end: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int]] = field(default_factory=list)


class _Otel:
    """Spans as Triton makes them: a root ``InferRequest`` span (the frontend's stamps as
    its events), under it one span per traced request named after its model (attributes
    triton.model_name, triton.model_version, triton.trace_id, triton.trace_parent_id,
    triton.request_id) and under that a ``compute`` span. Built from the records when the
    request is done; the SDK's batch span processor exports them from its own thread."""

    def __init__(self, options: TraceOptions, exporter: Any = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, Any] = {"service.name": "triton-inference-server"}
        for key, value in options.extra:
            if key == "resource":
                k, _, v = value.partition("=")
                attributes[k] = v
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=options.option("url", OTEL_DEFAULT_URL))
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=int(options.option("bsp_max_queue_size", "2048")),
            schedule_delay_millis=float(options.option("bsp_schedule_delay", "5000")),
            max_export_batch_size=int(options.option("bsp_max_export_batch_size", "512")),
        )
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("triton-server")
        self.propagator = TraceContextTextMapPropagator()

    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The client's span context (W3C ``traceparent``), or ``None``."""
        from opentelemetry import trace as otel_trace

        if "traceparent" not in carrier:
            return None
        ctx = self.propagator.extract(carrier={k.lower(): v for k, v in carrier.items()})
        span = otel_trace.get_current_span(ctx)
        return ctx if span.get_span_context().is_valid else None

    def export(self, tree: TraceTree) -> None:
        from opentelemetry import trace as otel_trace
        from opentelemetry.trace import SpanKind

        off = tree.offset_ns
        end_ns = time.monotonic_ns()
        root = self.tracer.start_span(
            "InferRequest", context=tree.otel_parent, kind=SpanKind.SERVER, start_time=tree.started_ns + off
        )
        requests: dict[int, tuple[Any, int]] = {}
        computes: dict[int, tuple[Any, int, int]] = {}
        for t in sorted(tree.traces.values(), key=lambda x: x.id):
            request, compute = _plans(t, root, off)
            if request is None:
                continue
            parent = root
            if t.parent_id in requests:
                parent = requests[t.parent_id][0]
                window = computes.get(t.parent_id)
                if window is not None and window[1] <= request.start <= window[2]:
                    parent = window[0]  # a BLS call made while its caller executed
            span = self.tracer.start_span(
                request.name,
                context=otel_trace.set_span_in_context(parent),
                kind=SpanKind.SERVER,
                start_time=request.start + off,
                attributes=request.attributes,
            )
            for name, ns in request.events:
                span.add_event(name, timestamp=ns + off)
            requests[t.id] = (span, request.end)
            if compute is not None:
                cspan = self.tracer.start_span(
                    "compute",
                    context=otel_trace.set_span_in_context(span),
                    kind=SpanKind.SERVER,
                    start_time=compute.start + off,
                )
                for name, ns in compute.events:
                    cspan.add_event(name, timestamp=ns + off)
                computes[t.id] = (cspan, compute.start, compute.end)
        for cspan, _, cend in computes.values():
            cspan.end(end_time=cend + off)
        for trace_id in sorted(requests, reverse=True):  # children before their parents
            span, rend = requests[trace_id]
            span.end(end_time=rend + off)
        root.end(end_time=end_ns + off)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _plans(t: Trace, root: Any, off: int) -> tuple[_SpanPlan | None, _SpanPlan | None]:
    """The request and compute spans of one trace from its records; the frontend's stamps
    (and any before the request started) go on the root span."""
    request: _SpanPlan | None = None
    compute: _SpanPlan | None = None
    for r in t.records:
        if r[0] == "model":
            attrs: dict[str, Any] = {
                "triton.model_name": r[1],
                "triton.model_version": r[2],
                "triton.trace_id": t.id,
                "triton.trace_parent_id": t.parent_id,
            }
            if r[3]:
                attrs["triton.request_id"] = r[3]
            request = _SpanPlan(r[1], 0, 0, attrs)
        elif r[0] == "ts":
            name, ns = r[1], r[2]
            if name in FRONTEND_STAMPS or request is None:
                root.add_event(name, timestamp=ns + off)
            elif name.startswith("COMPUTE_"):
                if compute is None:
                    compute = _SpanPlan("compute", ns, ns)
                compute.events.append((name, ns))
                compute.end = ns
            else:
                if name == "REQUEST_START":
                    request.start = ns
                request.events.append((name, ns))
                request.end = max(request.end, ns)
    if request is not None and compute is not None:
        request.end = max(request.end, compute.end)
    return request, compute
