"""Custom metrics of Python models (``pb_utils.MetricFamily``): the router owns their values,
so they survive a worker restart (the new process defines the same family and metric and finds
its value), and drops a model's families when no version of it is loaded. Rendered on the
metrics endpoint beside Triton's, with ``# HELP`` and ``# TYPE`` lines."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field

from shoal.proto import wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server import promtext
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.models.registry import Registry
from shoal.server.models.version import ModelState

log = logging.getLogger("shoal.metrics")

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
KINDS = ("counter", "gauge", "histogram")
DEFINE_FAMILY, DEFINE_METRIC, INCREMENT, SET, OBSERVE = range(5)
MAX_FAMILIES = 1024
MAX_METRICS_PER_FAMILY = 4096
_RESERVED_PREFIX = "nv_"


class MetricError(Exception):
    pass


@dataclass
class _Metric:
    value: float = 0.0
    buckets: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)
    count: int = 0


@dataclass
class _Family:
    name: str
    description: str
    kind: int
    model: str
    metrics: dict[tuple[tuple[str, str], ...], _Metric] = field(default_factory=dict)


class CustomMetrics:
    def __init__(self, channel: WorkerChannel, registry: Registry) -> None:
        self.channel = channel
        self.registry = registry
        self.families: dict[str, _Family] = {}
        channel.services["metric_op"] = self.on_message

    def model_of(self, identity: bytes) -> str | None:
        """The model a worker serves (None: not a worker the router started)."""
        return self.channel.models.get(identity)

    def loaded(self, model: str) -> bool:
        """Some version of ``model`` is loaded or loading (its families stay meanwhile)."""
        live = (ModelState.READY, ModelState.LOADING)
        return any(mv.state in live for mv in self.registry.models.get(model, {}).values())

    def on_message(self, identity: bytes, env: wpb.Envelope, frames: list[bytes]) -> None:
        op = env.metric_op
        value, error = 0.0, ""
        try:
            value = self.apply(identity, op)
        except MetricError as exc:
            error = str(exc)
            if not op.call_id:
                log.warning("custom metric '%s': %s", op.family[:64], error)
        if op.call_id:
            reply = wire.envelope(0)
            reply.metric_reply.call_id = op.call_id
            reply.metric_reply.value = value
            reply.metric_reply.error = error
            try:
                self.channel.send(identity, reply)
            except Exception:  # noqa: BLE001 - the worker went away; nothing to answer
                pass

    def apply(self, identity: bytes, op: wpb.MetricOp) -> float:
        """One operation; returns the metric's value (definitions) or raises ``MetricError``."""
        model = self.model_of(identity)
        if model is None:
            raise MetricError("the worker is not serving a model")
        name = op.family
        if op.op == DEFINE_FAMILY:
            return self._define_family(model, name, op.description, op.kind)
        family = self.families.get(name)
        if family is None:
            raise MetricError(f"metric family '{name[:64]}' is not defined")
        try:
            labels = json.loads(op.labels_json) if op.labels_json else {}
        except ValueError:
            raise MetricError("metric labels are not JSON") from None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise MetricError("metric labels must map names to strings")
        bad = [k for k in labels if not _LABEL.match(k)]
        if bad:
            raise MetricError(f"invalid metric label name '{bad[0][:64]}'")
        key = tuple(sorted(labels.items()))
        metric = family.metrics.get(key)
        if op.op == DEFINE_METRIC:
            if metric is None:
                if len(family.metrics) >= MAX_METRICS_PER_FAMILY:
                    raise MetricError(f"metric family '{name}' has {MAX_METRICS_PER_FAMILY} metrics already")
                buckets = tuple(op.buckets)
                metric = family.metrics[key] = _Metric(buckets=buckets, counts=[0] * len(buckets))
            return metric.value
        if metric is None:
            raise MetricError(f"metric of family '{name[:64]}' with these labels is not defined")
        if not math.isfinite(op.value):
            raise MetricError("metric values must be finite")
        if op.op == INCREMENT:
            metric.value += op.value
        elif op.op == SET:
            metric.value = op.value
        elif op.op == OBSERVE:
            metric.value += op.value
            metric.count += 1
            for i, bound in enumerate(metric.buckets):
                if op.value <= bound:
                    metric.counts[i] += 1
        else:
            raise MetricError(f"unknown metric operation {op.op}")
        return metric.value

    def _define_family(self, model: str, name: str, description: str, kind: int) -> float:
        if not _NAME.match(name):
            raise MetricError(f"invalid metric family name '{name[:64]}'")
        if name.startswith(_RESERVED_PREFIX):
            raise MetricError(f"metric family names starting with '{_RESERVED_PREFIX}' are reserved for the server")
        if kind not in (0, 1, 2):
            raise MetricError(f"unknown metric kind {kind}")
        family = self.families.get(name)
        if family is not None and not self.loaded(family.model):
            del self.families[name]  # left by a model that is gone
            family = None
        if family is None:
            if len(self.families) >= MAX_FAMILIES:
                raise MetricError(f"{MAX_FAMILIES} metric families are defined already")
            self.families[name] = _Family(name, description, kind, model)
            return 0.0
        if family.model != model:
            raise MetricError(f"metric family '{name}' is already defined by model '{family.model}'")
        if family.kind != kind:
            raise MetricError(f"metric family '{name}' is already defined as a {KINDS[family.kind]}")
        return 0.0

    def render(self, lines: list[str]) -> None:
        """Append the exposition of every family of a loaded model (others are dropped)."""
        for name in list(self.families):
            family = self.families[name]
            if not self.loaded(family.model):
                del self.families[name]
                continue
            lines.append(f"# HELP {name} {_help(family.description)}")
            lines.append(f"# TYPE {name} {KINDS[family.kind]}")
            for key, m in family.metrics.items():
                if family.kind == 2:
                    for bound, n in zip(m.buckets, m.counts, strict=True):  # counts are cumulative
                        lines.append(f"{name}_bucket{_labels(key, ('le', promtext.number(bound)))} {n}")
                    lines.append(f"{name}_bucket{_labels(key, ('le', '+Inf'))} {m.count}")
                    lines.append(f"{name}_sum{_labels(key)} {promtext.number(m.value)}")
                    lines.append(f"{name}_count{_labels(key)} {m.count}")
                else:
                    lines.append(f"{name}{_labels(key)} {promtext.number(m.value)}")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(key: tuple[tuple[str, str], ...], *extra: tuple[str, str]) -> str:
    return promtext.labels([*key, *extra])
