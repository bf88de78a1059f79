"""``--metrics-config``: Triton's optional latency metrics per model.

- ``summary_latencies=true``: summaries (``nv_inference_request_summary_us``, queue and the
  three compute phases, and the cache's where it is on) with quantiles over a sliding window
  of the last minute (prometheus-cpp's default ``max_age``), plus all-time ``_count`` and
  ``_sum``; ``summary_quantiles=<q>:<error>,...`` chooses the quantiles (the error is
  accepted; quantiles here are exact over the window).
- ``histogram_latencies=true``: ``nv_inference_first_response_histogram_ms`` with Triton's
  default buckets (100, 500, 2000, 5000 ms).
- ``counter_latencies=false``: drops the cumulative ``*_duration_us`` counters.

Observations cost one append per phase per request, and nothing when off. Owned by the
router's event loop."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0
WINDOW_MAX = 100_000
"""Observations kept per summary (the oldest go first when requests come faster)."""
DEFAULT_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.5, 0.05),
    (0.9, 0.01),
    (0.95, 0.001),
    (0.99, 0.001),
    (0.999, 0.001),
)
FIRST_RESPONSE_BUCKETS_MS = (100.0, 500.0, 2000.0, 5000.0)

SUMMARIES = (
    ("request", "nv_inference_request_summary_us",
     "Summary of inference request duration in microseconds (includes cached requests)"),
    ("queue", "nv_inference_queue_summary_us",
     "Summary of inference queuing duration in microseconds (includes cached requests)"),
    ("compute_input", "nv_inference_compute_input_summary_us",
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("compute_infer", "nv_inference_compute_infer_summary_us",
     "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    ("compute_output", "nv_inference_compute_output_summary_us",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)"),
    ("cache_hit", "nv_cache_hit_summary_per_model",
     "Summary of cache hit counts/durations per model, in microseconds."),
    ("cache_miss", "nv_cache_miss_summary_per_model",
     "Summary of cache miss counts/durations per model, in microseconds."),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    summaries: bool = False
    quantiles: tuple[tuple[float, float], ...] = DEFAULT_QUANTILES
    histograms: bool = False
    counters: bool = True

    @property
    def any(self) -> bool:
        return self.summaries or self.histograms


def parse(settings: tuple[tuple[str, str], ...], problems: list[str]) -> LatencyConfig:
    summaries, histograms, counters = False, False, True
    quantiles = DEFAULT_QUANTILES
    for key, value in settings:
        flag = value.strip().lower() == "true"
        if key == "summary_latencies":
            summaries = flag
        elif key == "histogram_latencies":
            histograms = flag
        elif key == "counter_latencies":
            counters = value.strip().lower() != "false"
        elif key == "summary_quantiles":
            try:
                pairs = [p.split(":") for p in value.split(",") if p.strip()]
                quantiles = tuple((float(q), float(e)) for q, e in pairs)
                if not quantiles or not all(0 <= q <= 1 for q, _ in quantiles):
                    raise ValueError
            except ValueError:
                problems.append(f"--metrics-config summary_quantiles={value}: expected <quantile>:<error>,...")
    return LatencyConfig(summaries, quantiles, histograms, counters)


class Window:
    """Observations of the last ``WINDOW_S`` seconds, and all-time count and sum."""

    __slots__ = ("_obs", "count", "sum")

    def __init__(self) -> None:
        self._obs: deque[tuple[float, float]] = deque(maxlen=WINDOW_MAX)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        now = time.monotonic()
        for _ in range(n):
            self._obs.append((now, value))
        self.count += n
        self.sum += value * n

    def quantiles(self, qs: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
        horizon = time.monotonic() - WINDOW_S
        while self._obs and self._obs[0][0] < horizon:
            self._obs.popleft()
        values = sorted(v for _, v in self._obs)
        if not values:
            return [(q, math.nan) for q, _ in qs]
        return [(q, values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]) for q, _ in qs]


class Histogram:
    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            total += n
            out.append((f"{bound:g}", total))
        out.append(("+Inf", self.count))
        return out


class LatencyMetrics:
    """One model version's optional latency metrics."""

    __slots__ = ("config", "summaries", "first_response")

    def __init__(self, config: LatencyConfig) -> None:
        self.config = config
        self.summaries = {key: Window() for key, *_ in SUMMARIES} if config.summaries else {}
        self.first_response = Histogram(FIRST_RESPONSE_BUCKETS_MS) if config.histograms else None

    def request(self, total_ns: int, queue_ns: int) -> None:
        s = self.summaries
        if s:
            s["request"].observe(total_ns / 1000)
            s["queue"].observe(queue_ns / 1000)
        if self.first_response is not None:
            self.first_response.observe(total_ns / 1e6)

    def compute(self, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        s = self.summaries
        if s:
            s["compute_input"].observe(input_ns / 1000, requests)
            s["compute_infer"].observe(infer_ns / 1000, requests)
            s["compute_output"].observe(output_ns / 1000, requests)

    def cache(self, hit: bool, ns: int) -> None:
        if self.summaries:
            self.summaries["cache_hit" if hit else "cache_miss"].observe(ns / 1000)
