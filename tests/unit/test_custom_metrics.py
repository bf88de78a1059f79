"""Custom metrics: the router's registry (``server.custommetrics``) and the model-side API
(``pb_utils.MetricFamily`` / ``Metric``) against it, without processes."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest

from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.custommetrics import CustomMetrics
from shoal.server.models.version import ModelState
from shoal.workers.backends.python import pb_utils


class FakeChannel:
    def __init__(self) -> None:
        self.services: dict[str, Any] = {}
        self.models = {b"w1": "m1", b"w2": "m2"}


class FakeVersion:
    state = ModelState.READY


class FakeRegistry:
    def __init__(self) -> None:
        self.models: dict[str, dict[int, Any]] = {"m1": {1: FakeVersion()}, "m2": {1: FakeVersion()}}


class Client:
    """What a worker's MetricsClient does, straight into the registry."""

    def __init__(self, registry: CustomMetrics, identity: bytes = b"w1") -> None:
        self.registry = registry
        self.identity = identity

    def op(self, op: int, family: str, *, wait: bool = False, labels: Any = None, **kw: Any) -> tuple[float, str]:
        m = wpb.MetricOp(family=family, op=op, **{k: v for k, v in kw.items() if k != "buckets"})
        m.buckets.extend(kw.get("buckets", ()))
        if labels is not None:
            m.labels_json = json.dumps(labels, sort_keys=True)
        try:
            return self.registry.apply(self.identity, m), ""
        except Exception as exc:  # noqa: BLE001
            if not wait:
                raise
            return 0.0, str(exc)


@pytest.fixture
def reg() -> CustomMetrics:
    return CustomMetrics(FakeChannel(), FakeRegistry())  # type: ignore[arg-type]


@pytest.fixture
def pb(reg: CustomMetrics) -> ModuleType:
    module = pb_utils()
    module._set_metrics(Client(reg))
    yield module
    module._set_metrics(None)


def _text(reg: CustomMetrics) -> str:
    lines: list[str] = []
    reg.render(lines)
    return "\n".join(lines)


def test_each_kind_renders(pb: ModuleType, reg: CustomMetrics) -> None:
    c = pb.MetricFamily("c", "a counter", pb.MetricFamily.COUNTER).Metric(labels={"k": 'v"1'})
    g = pb.MetricFamily("g", "a gauge", pb.MetricFamily.GAUGE).Metric()
    h = pb.MetricFamily("h", "a histogram", pb.MetricFamily.HISTOGRAM).Metric(buckets=[0.5, 2])
    c.increment(2)
    c.increment(0.5)
    g.set(-3)
    g.increment(1)
    for v in (0.1, 1, 5):
        h.observe(v)
    assert c.value() == 2.5 and g.value() == -2
    text = _text(reg)
    assert '# TYPE c counter\nc{k="v\\"1"} 2.5' in text
    assert "# HELP g a gauge\n# TYPE g gauge\ng -2" in text
    assert 'h_bucket{le="0.5"} 1\nh_bucket{le="2"} 2\nh_bucket{le="+Inf"} 3\nh_sum 6.1\nh_count 3' in text


def test_model_side_misuse_raises(pb: ModuleType) -> None:
    counter = pb.MetricFamily("cc", "x", pb.MetricFamily.COUNTER).Metric()
    with pytest.raises(pb.TritonModelException, match="negative"):
        counter.increment(-1)
    with pytest.raises(pb.TritonModelException, match="only supported for gauge"):
        counter.set(1)
    with pytest.raises(pb.TritonModelException, match="only supported for histogram"):
        counter.observe(1)
    with pytest.raises(pb.TritonModelException, match="needs buckets"):
        pb.MetricFamily("hh", "x", pb.MetricFamily.HISTOGRAM).Metric()
    with pytest.raises(pb.TritonModelException, match="strictly increasing"):
        pb.MetricFamily("hh", "x", pb.MetricFamily.HISTOGRAM).Metric(buckets=[2, 1])
    with pytest.raises(pb.TritonModelException, match="unknown metric kind"):
        pb.MetricFamily("k", "x", 7)


@pytest.mark.parametrize(
    ("name", "words"), [("1bad", "invalid metric family name"), ("nv_mine", "reserved"), ("a-b", "invalid")]
)
def test_bad_family_names_are_refused(pb: ModuleType, name: str, words: str) -> None:
    with pytest.raises(pb.TritonModelException, match=words):
        pb.MetricFamily(name, "x", pb.MetricFamily.GAUGE)


def test_families_belong_to_one_model_and_kind(pb: ModuleType, reg: CustomMetrics) -> None:
    pb.MetricFamily("shared", "x", pb.MetricFamily.GAUGE)
    with pytest.raises(pb.TritonModelException, match="already defined as a gauge"):
        pb.MetricFamily("shared", "x", pb.MetricFamily.COUNTER)
    value, error = Client(reg, b"w2").op(0, "shared", wait=True, kind=1)
    assert "already defined by model 'm1'" in error
    with pytest.raises(pb.TritonModelException, match="invalid metric label name"):
        pb.MetricFamily("lab", "x", pb.MetricFamily.GAUGE).Metric(labels={"bad-label": "v"})


def test_a_gone_model_takes_its_families_along(pb: ModuleType, reg: CustomMetrics) -> None:
    pb.MetricFamily("mine", "x", pb.MetricFamily.GAUGE).Metric().set(1)
    assert "mine 1" in _text(reg)
    reg.registry.models["m1"][1].state = ModelState.UNAVAILABLE  # type: ignore[misc]
    assert "mine" not in _text(reg)
    assert "mine" not in reg.families
