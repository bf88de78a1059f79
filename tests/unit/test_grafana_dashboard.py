"""deploy/grafana/shoal.json: every PromQL expression (panels and variables) names only
metrics Shoal exports, with Triton's names (read from the tables ``server/metrics.py`` and
``server/latencymetrics.py`` render ``/metrics`` from; tests/e2e/test_grafana_metrics.py
checks the same names against a real server's scrape), and every Triton metric Shoal exports
has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shoal.server import latencymetrics, metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shoal.json"
HISTOGRAM = "nv_inference_first_response_histogram_ms"

# PromQL's functions and aggregation operators (followed by "(") and keywords
FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min", "count",
    "count_over_time", "delta", "deriv", "floor", "group", "histogram_quantile", "idelta", "increase",
    "irate", "label_replace", "max", "max_over_time", "min", "min_over_time", "quantile", "rate",
    "round", "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time", "time", "topk", "vector",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def exported() -> set[str]:
    """Every metric name Shoal's ``/metrics`` can carry (series names, with the suffixes of
    summaries and histograms)."""
    names = {"nv_inference_request_failure"}
    for table in (metrics._MODEL_METRICS, metrics._CACHE_METRICS, metrics._GPU_METRICS, metrics._CPU_METRICS):
        names |= {row[0] for row in table}
    for _, name, _ in latencymetrics.SUMMARIES:
        names |= {name, f"{name}_sum", f"{name}_count"}
    names |= {f"{HISTOGRAM}_bucket", f"{HISTOGRAM}_sum", f"{HISTOGRAM}_count"}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's ``$variables`` allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group()
        if e[m.end() :].lstrip().startswith("("):
            assert word in FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def _dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def expressions() -> list[str]:
    d = _dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert found, query
            exprs.append(found.group(1))
    return exprs


def test_extractor() -> None:
    assert metric_names('sum by (model, le) (rate(a_b{model=~"$model",x="y{z}"}[$__rate_interval]))') == {"a_b"}
    assert metric_names("histogram_quantile(0.95, sum(rate(h_bucket[5m]))) / c") == {"h_bucket", "c"}
    assert metric_names("x{a='b'} and on (a) y offset 5m") == {"x", "y"}
    with pytest.raises(AssertionError):
        metric_names("made_up_function(x)")


def test_every_query_names_exported_metrics_only() -> None:
    known = exported()
    exprs = expressions()
    assert len(exprs) > 20
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} not exported by Shoal: {expr}"


def test_every_triton_metric_has_a_panel() -> None:
    used = set().union(*(metric_names(e) for e in expressions()))
    wanted = {"nv_inference_request_failure"}
    for table in (metrics._MODEL_METRICS, metrics._GPU_METRICS, metrics._CPU_METRICS):
        wanted |= {row[0] for row in table}
    assert wanted <= used, sorted(wanted - used)


def test_dashboard_structure() -> None:
    d = _dashboard()
    assert d["uid"] and d["title"] == "Shoal" and d["schemaVersion"] >= 36
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "instance", "model"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert p["fieldConfig"]["defaults"]["unit"]
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for topic in ("request rate", "failures by reason", "latency", "queue", "compute", "gpu", "cpu"):
        assert topic in titles, topic
