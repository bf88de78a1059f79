"""Custom metrics of ``triton_python_backend_utils`` (re-exported by that module):
``MetricFamily`` and ``Metric``, backed by the worker's ``MetricsClient`` (the router owns the
values)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any, ClassVar

from _shoal_pb_tensor import TritonModelException

_METRICS: list[Any] = [None]
"""The worker's custom-metrics client (``workers.custommetrics.MetricsClient``)."""


class MetricFamily:
    """A custom metric family (Prometheus): ``COUNTER``, ``GAUGE`` or ``HISTOGRAM``. Its
    metrics appear on the server's metrics endpoint beside Triton's."""

    COUNTER: ClassVar[int] = 0
    GAUGE: ClassVar[int] = 1
    HISTOGRAM: ClassVar[int] = 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"unknown metric kind {kind}: use MetricFamily.COUNTER, GAUGE or HISTOGRAM")
        self._name = name
        self._description = description
        self._kind = int(kind)
        _metric_call(0, name, description=description, kind=self._kind)

    def Metric(self, labels: Mapping[str, str] | None = None, buckets: Sequence[float] | None = None) -> Metric:
        """The metric of this family with these labels (created on first use)."""
        return Metric(self, dict(labels or {}), list(buckets) if buckets is not None else None)


class Metric:
    """One labelled metric of a ``MetricFamily``."""

    def __init__(self, family: MetricFamily, labels: dict[str, str], buckets: list[float] | None) -> None:
        if family._kind == MetricFamily.HISTOGRAM:
            if not buckets:
                raise TritonModelException("a histogram metric needs buckets")
            if any(b >= c for b, c in zip(buckets, buckets[1:], strict=False)):
                raise TritonModelException("histogram buckets must be strictly increasing")
        elif buckets is not None:
            raise TritonModelException("only histogram metrics take buckets")
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TritonModelException("metric labels must map strings to strings")
        self._family = family
        self._labels = labels
        self._buckets = buckets or []
        self._value = _metric_call(1, family._name, kind=family._kind, labels=labels, buckets=self._buckets)

    def _update(self, op: int, value: float) -> None:
        client = _METRICS[0]
        if client is not None:
            client.op(op, self._family._name, kind=self._family._kind, labels=self._labels, value=value)

    def increment(self, value: float) -> None:
        """Add ``value`` (counters: not negative; gauges: any)."""
        kind = self._family._kind
        if kind == MetricFamily.HISTOGRAM:
            raise TritonModelException("increment() is not supported for histogram metrics; use observe()")
        if kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("a counter cannot be incremented by a negative value")
        self._value += value
        self._update(2, value)

    def set(self, value: float) -> None:
        """Set a gauge to ``value``."""
        if self._family._kind != MetricFamily.GAUGE:
            raise TritonModelException("set() is only supported for gauge metrics")
        self._value = float(value)
        self._update(3, value)

    def observe(self, value: float) -> None:
        """Record one observation in a histogram."""
        if self._family._kind != MetricFamily.HISTOGRAM:
            raise TritonModelException("observe() is only supported for histogram metrics")
        self._value += value
        self._update(4, value)

    def value(self) -> float:
        """The metric's current value (a histogram: the sum of its observations)."""
        return self._value


def _metric_call(op: int, family: str, **kw: Any) -> float:
    client = _METRICS[0]
    if client is None:
        raise TritonModelException("custom metrics can only be used in a model running in a Shoal worker")
    value, error = client.op(op, family, wait=True, **kw)
    if error:
        raise TritonModelException(error)
    return float(value)


def _set_metrics(client: Any) -> None:
    _METRICS[0] = client


class MetricKind(IntEnum):
    """The kinds of ``MetricFamily`` (also ``MetricFamily.COUNTER`` and so on)."""

    COUNTER = MetricFamily.COUNTER
    GAUGE = MetricFamily.GAUGE
    HISTOGRAM = MetricFamily.HISTOGRAM
