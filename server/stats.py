"""Per model-version statistics (Triton's statistics extension): what the schedulers and
the dispatcher record, and its JSON form (every field present, zeros included, since
perf_analyzer reads them without checking)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shoal.proto.errors import FAILURE_REASONS as FAILURE_REASONS
from shoal.proto.errors import failure_reason as failure_reason
from shoal.server.latencymetrics import LatencyMetrics
from shoal.server.reservoir import Reservoir

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    name: str
    version: int
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {k: Duration() for k in DURATIONS})
    batches: dict[int, BatchStats] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    """Failed requests by ``failure_reason`` (Prometheus metrics)."""
    latency: LatencyMetrics | None = None
    """``--metrics-config`` summaries and histograms (None: off)."""
    recent: Reservoir = field(default_factory=Reservoir)
    """Latencies of successful requests since the status page's last sample (``server.status``)."""

    def failed(self, exc: BaseException) -> None:
        self.failures[failure_reason(exc)] += 1

    def request_done(self, ok: bool, total_ns: int, queue_ns: int) -> None:
        """One request answered: ``total_ns`` from arrival at the scheduler to the answer."""
        self.durations["success" if ok else "fail"].add(total_ns)
        if ok:
            self.durations["queue"].add(queue_ns)
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.recent.add(total_ns)
            if self.latency is not None:
                self.latency.request(total_ns, queue_ns)

    def cache_hit(self, lookup_ns: int) -> None:
        """A request answered from the response cache: a success (its whole time was the
        lookup), not an inference or an execution."""
        self.durations["cache_hit"].add(lookup_ns)
        self.request_done(True, lookup_ns, 0)
        if self.latency is not None:
            self.latency.cache(True, lookup_ns)

    def cache_miss(self, ns: int) -> None:
        """A request the cache could not answer: ``ns`` is the lookup plus the insertion."""
        self.durations["cache_miss"].add(ns)
        if self.latency is not None:
            self.latency.cache(False, ns)

    def execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int, rows: int = 0
    ) -> None:
        """One model execution of ``requests`` requests, ``batch_size`` batch elements;
        ``rows``: the executed batch size when it includes null (filler) requests."""
        self.execution_count += 1
        self.inference_count += batch_size
        d = self.durations
        d["compute_input"].add(input_ns, requests)
        d["compute_infer"].add(infer_ns, requests)
        d["compute_output"].add(output_ns, requests)
        if self.latency is not None:
            self.latency.compute(requests, input_ns, infer_ns, output_ns)
        size = rows or batch_size
        b = self.batches.get(size)
        if b is None:
            b = self.batches[size] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": str(self.version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: d.as_dict() for k, d in self.durations.items()},
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
