"""The status page's parts: the latency reservoir (bounded, uniform), the history sampler
(rates, quantiles and queue depth from the statistics counters; versions added and removed),
the recent-events ring, and the page (self-contained, text only)."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace
from typing import Any, cast

import pytest

from shoal.server import events, reservoir, status, statuspage
from shoal.server.stats import ModelStats


def test_reservoir_is_bounded_and_uniform() -> None:
    random.seed(7)
    r = reservoir.Reservoir()
    for v in range(100_000):
        r.add(v)
    sample = r.take()
    assert len(sample) == reservoir.SIZE and r.take() == [] and r.seen == 0
    # uniform over the whole interval: the sample's median is near the true one
    assert 40_000 < sorted(sample)[len(sample) // 2] < 60_000
    r.add(5)
    assert r.take() == [5]


def test_quantile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert status.quantile(values, 0.5) == 50
    assert status.quantile(values, 0.99) == 99
    assert status.quantile([3], 0.99) == 3


def _models(registry: dict[str, dict[int, Any]]) -> Any:
    return SimpleNamespace(registry=SimpleNamespace(models=registry))


def _version(stats: ModelStats, pending: int = 0) -> Any:
    return SimpleNamespace(stats=stats, scheduler=SimpleNamespace(pending=pending))


def test_sampler_rates_latency_and_queue() -> None:
    a1, a2 = ModelStats("a", 1), ModelStats("a", 2)
    reg: dict[str, dict[int, Any]] = {"a": {1: _version(a1, 2), 2: _version(a2, 1)}, "gone": {}}
    mon = status.StatusMonitor(cast(Any, _models(reg)), interval_s=5)
    assert mon.points == 120  # ten minutes
    for ms in range(1, 101):
        (a1 if ms % 2 else a2).request_done(True, ms * 1_000_000, 0)
    a1.failed(RuntimeError())
    a1.request_done(False, 1, 0)
    mon.sample(5.0)
    s = mon.series["a"]
    assert list(s["rps"]) == [20.0] and list(s["failures"]) == [0.2]
    assert list(s["p50_ms"]) == [50.0] and list(s["p99_ms"]) == [99.0]
    assert list(s["avg_ms"]) == [50.5] and list(s["pending"]) == [3]
    assert "gone" not in mon.series  # no version: no numbers
    mon.sample(5.0)  # nothing happened since
    assert list(s["rps"])[-1] == 0.0 and list(s["p50_ms"])[-1] is None and list(s["avg_ms"])[-1] is None
    # a reload: new statistics objects count from zero, not as negative rates
    b = ModelStats("a", 1)
    b.request_done(True, 2_000_000, 0)
    reg["a"] = {1: _version(b)}
    mon.sample(1.0)
    assert list(s["rps"])[-1] == 1.0 and list(s["p50_ms"])[-1] == 2.0
    del reg["a"]
    mon.sample(1.0)
    assert mon.series == {}


def test_sampler_history_is_bounded() -> None:
    st = ModelStats("a", 1)
    mon = status.StatusMonitor(cast(Any, _models({"a": {1: _version(st)}})), interval_s=5, history_s=60)
    for _ in range(50):
        mon.sample(5.0)
    assert {len(v) for v in mon.series["a"].values()} == {12}


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_STATUS_INTERVAL_S", "0.25")
    assert status.StatusMonitor(cast(Any, _models({}))).interval_s == 0.25
    for bad in ("x", "0", "-1"):
        monkeypatch.setenv("SHOAL_STATUS_INTERVAL_S", bad)
        assert status.StatusMonitor(cast(Any, _models({}))).interval_s == status.INTERVAL_S


def test_event_log_keeps_the_last() -> None:
    log = events.EventLog(maxlen=3)
    for i in range(5):
        log.add(events.WORKER_EXITED, "m", f"exit {i}", version=1, instance="m_0", pid=100 + i)
    log.add(events.LOAD_FAILED, "n", "bad config")
    rows = log.as_list()
    assert [r["message"] for r in rows] == ["exit 3", "exit 4", "bad config"]
    assert rows[-1]["version"] == "" and rows[-1]["pid"] == 0 and rows[0]["version"] == "1"
    assert set(rows[0]) == {"time", "kind", "model", "version", "instance", "pid", "message"}


def test_page_is_self_contained_and_inserts_text_only() -> None:
    page = statuspage.PAGE
    assert "__REFRESH_MS__" not in page and f"REFRESH_MS = {statuspage.REFRESH_MS};" in page
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    assert "connect-src 'self'" in statuspage.CSP and "default-src 'none'" in statuspage.CSP
    assert statuspage.PAGE_BYTES.decode() == page
