"""Prometheus metrics with Triton's names (``GET /metrics`` on ``--metrics-port``).

Model metrics are read from each ready version's ``ModelStats`` at scrape time (the
statistics extension's numbers, so the two always agree). CPU metrics come from
``/proc/stat`` and ``/proc/meminfo``, GPU metrics from NVML (``nvidia-ml-py``; none when the
library or a driver is missing); both are sampled every ``--metrics-interval-ms`` in a
thread, off the event loop. The text is written here rather than by ``prometheus_client``:
that library renames counters (``_total``), adds ``_created`` series and prints large values
with an exponent, which perf_analyzer's GPU-metric parser cannot read.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.server.custommetrics import CustomMetrics
from shoal.server.latencymetrics import SUMMARIES, LatencyConfig
from shoal.server.models import ModelManager, ModelVersion
from shoal.server.promtext import labels as _labels
from shoal.server.promtext import number
from shoal.server.stats import FAILURE_REASONS

log = logging.getLogger("shoal.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, value of a ModelVersion
_MODEL_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
     lambda mv: mv.stats.durations["success"].count),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
     lambda mv: mv.stats.inference_count),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)",
     lambda mv: mv.stats.execution_count),
    ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution "
     "per-model.", lambda mv: mv.scheduler.pending if mv.scheduler is not None else 0),
    ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds "
     "(includes cached requests)", lambda mv: mv.stats.durations["success"].ns // 1000),
    ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds "
     "(includes cached requests)", lambda mv: mv.stats.durations["queue"].ns // 1000),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative compute input duration in microseconds "
     "(does not include cached requests)", lambda mv: mv.stats.durations["compute_input"].ns // 1000),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds "
     "(does not include cached requests)", lambda mv: mv.stats.durations["compute_infer"].ns // 1000),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in "
     "microseconds (does not include cached requests)", lambda mv: mv.stats.durations["compute_output"].ns // 1000),
    ("nv_model_load_duration_secs", "gauge", "Model load time in seconds", lambda mv: mv.load_seconds),
)  # fmt: skip

# the response cache's, for models that use it (Triton's per-model cache metrics)
_CACHE_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("nv_cache_num_hits_per_model", "counter", "Number of cache hits per model",
     lambda mv: mv.stats.durations["cache_hit"].count),
    ("nv_cache_num_misses_per_model", "counter", "Number of cache misses per model",
     lambda mv: mv.stats.durations["cache_miss"].count),
    ("nv_cache_hit_duration_per_model", "counter", "Total cache hit duration per model, in microseconds",
     lambda mv: mv.stats.durations["cache_hit"].ns // 1000),
    ("nv_cache_miss_duration_per_model", "counter", "Total cache miss (insert+lookup) duration per model, in "
     "microseconds", lambda mv: mv.stats.durations["cache_miss"].ns // 1000),
)  # fmt: skip

_GPU_METRICS = (
    ("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)"),
    ("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes"),
    ("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes"),
    ("nv_gpu_power_usage", "gauge", "GPU power usage in watts"),
    ("nv_gpu_power_limit", "gauge", "GPU power management limit in watts"),
    ("nv_energy_consumption", "counter", "GPU energy consumption in joules since the Triton Server started"),
)
_CPU_METRICS = (
    ("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]"),
    ("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes"),
    ("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes"),
)


def model_labels(mv: ModelVersion) -> list[tuple[str, str]]:
    """``model``, ``version`` and ``_<key>`` for each ``metric_tags`` entry of the config."""
    labels = [("model", mv.name), ("version", str(mv.version))]
    labels += [(f"_{k}", v) for k, v in sorted(mv.config.metric_tags.items()) if k.replace("_", "").isalnum()]
    return labels


@dataclass(slots=True)
class _Samples:
    gpus: dict[str, dict[str, float]] = field(default_factory=dict)
    """gpu_uuid -> metric name -> value."""
    cpu: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Polls CPU and GPU figures; ``sample()`` blocks (run it in a thread)."""

    def __init__(self, *, cpu: bool, gpu: bool, gpu_devices: list[str] | None = None) -> None:
        """``gpu_devices``: the server's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (ordinals,
        taken as NVML indexes, or UUIDs); ``None``: every GPU NVML sees."""
        self.cpu = cpu
        self.gpu = gpu
        self.samples = _Samples()
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []
        self._energy_start: dict[str, float] = {}
        self._last_stat: tuple[int, int] | None = None
        if gpu:
            self._open_nvml(gpu_devices)

    def _open_nvml(self, wanted: list[str] | None) -> None:
        try:
            import pynvml  # type: ignore[import-untyped]  # no NVML, no GPU metrics

            pynvml.nvmlInit()
            found = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                found.append((uuid if isinstance(uuid, str) else uuid.decode(), handle))
            if wanted is None:
                self._handles = found
            else:
                for entry in wanted:
                    if entry.isdigit():
                        self._handles += found[int(entry) : int(entry) + 1]
                    else:
                        self._handles += [(u, h) for u, h in found if u.startswith(entry)][:1]
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no driver), ...
            log.info("GPU metrics off: %s", exc)
            self._handles = []

    def sample(self) -> None:
        if self._nvml is not None:
            self.samples.gpus = {uuid: self._gpu(uuid, h) for uuid, h in self._handles}
        if self.cpu:
            self.samples.cpu = self._cpu()

    def _gpu(self, uuid: str, handle: Any) -> dict[str, float]:
        nv = self._nvml
        out: dict[str, float] = {}
        reads: tuple[tuple[str, Callable[[], float]], ...] = (
            ("nv_gpu_utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0),
            ("nv_gpu_memory_total_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(handle).total),
            ("nv_gpu_memory_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(handle).used),
            ("nv_gpu_power_usage", lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            ("nv_gpu_power_limit", lambda: nv.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0),
            ("nv_energy_consumption", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0),
        )
        for name, read in reads:
            try:
                out[name] = float(read())
            except Exception:  # noqa: BLE001 - a GPU may not support a query
                continue
        if "nv_energy_consumption" in out:
            start = self._energy_start.setdefault(uuid, out["nv_energy_consumption"])
            out["nv_energy_consumption"] -= start
        return out

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            total = sum(fields[:8])
            if self._last_stat is not None and total > self._last_stat[1]:
                busy = 1.0 - (idle - self._last_stat[0]) / (total - self._last_stat[1])
                out["nv_cpu_utilization"] = min(1.0, max(0.0, busy))
            else:
                out["nv_cpu_utilization"] = 0.0
            self._last_stat = (idle, total)
            info: dict[str, int] = {}
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0]) * 1024
            out["nv_cpu_memory_total_bytes"] = info["MemTotal"]
            out["nv_cpu_memory_used_bytes"] = info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0))
        except (OSError, ValueError, IndexError, KeyError) as exc:
            log.debug("CPU metrics unavailable: %s", exc)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._nvml = None


class Metrics:
    def __init__(
        self,
        models: ModelManager,
        sampler: Sampler | None = None,
        interval_s: float = 2.0,
        custom: CustomMetrics | None = None,
        cache_on: bool = False,
        latency: LatencyConfig | None = None,
    ) -> None:
        self.latency = latency or LatencyConfig()
        self.custom = custom
        self.cache_on = cache_on
        """The server has a response cache (``--cache-config``): cache metrics are exported."""
        self.models = models
        self.sampler = sampler
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.sampler is not None and (self.sampler.cpu or self.sampler.gpu):
            self._task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        assert self.sampler is not None
        while True:
            try:
                await asyncio.to_thread(self.sampler.sample)
            except Exception:  # noqa: BLE001 - metrics must never stop the server
                log.exception("sampling CPU/GPU metrics failed")
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.sampler is not None:
            await asyncio.to_thread(self.sampler.close)

    def render(self) -> str:
        lines: list[str] = []
        versions = self.models.registry.ready_versions()
        labels = {id(mv): model_labels(mv) for mv in versions}
        _family(
            lines, "nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes"
        )
        for mv in versions:
            for reason in FAILURE_REASONS:
                pairs = [*labels[id(mv)], ("reason", reason)]
                lines.append(f"nv_inference_request_failure{_labels(pairs)} {mv.stats.failures[reason]}")
        for name, kind, text, value in _MODEL_METRICS:
            if not self.latency.counters and name.endswith("_duration_us"):
                continue  # --metrics-config counter_latencies=false
            _family(lines, name, kind, text)
            for mv in versions:
                lines.append(f"{name}{_labels(labels[id(mv)])} {number(value(mv))}")
        cached = [mv for mv in versions if self.cache_on and mv.cached]
        for name, kind, text, value in _CACHE_METRICS if cached else ():
            _family(lines, name, kind, text)
            for mv in cached:
                lines.append(f"{name}{_labels(labels[id(mv)])} {number(value(mv))}")
        self._render_latency(lines, versions, labels)
        samples = self.sampler.samples if self.sampler is not None else _Samples()
        if samples.gpus:
            for name, kind, text in _GPU_METRICS:
                _family(lines, name, kind, text)
                for uuid, values in samples.gpus.items():
                    if name in values:
                        lines.append(f"{name}{_labels([('gpu_uuid', uuid)])} {number(values[name])}")
        if samples.cpu:
            for name, kind, text in _CPU_METRICS:
                if name in samples.cpu:
                    _family(lines, name, kind, text)
                    lines.append(f"{name} {number(samples.cpu[name])}")
        if self.custom is not None:
            self.custom.render(lines)
        return "\n".join(lines) + "\n"

    def _render_latency(
        self, lines: list[str], versions: list[ModelVersion], labels: dict[int, list[tuple[str, str]]]
    ) -> None:
        measured = [mv for mv in versions if mv.stats.latency is not None]
        if not measured:
            return
        if self.latency.summaries:
            cached = self.cache_on
            for key, name, text in SUMMARIES:
                if key.startswith("cache") and not cached:
                    continue
                _family(lines, name, "summary", text)
                for mv in measured:
                    lat = mv.stats.latency
                    assert lat is not None
                    if key.startswith("cache") and not mv.cached:
                        continue
                    w = lat.summaries[key]
                    base = labels[id(mv)]
                    for q, v in w.quantiles(self.latency.quantiles):
                        shown = "NaN" if math.isnan(v) else number(v)  # no observation in the window
                        lines.append(f"{name}{_labels([*base, ('quantile', f'{q:g}')])} {shown}")
                    lines.append(f"{name}_sum{_labels(base)} {number(w.sum)}")
                    lines.append(f"{name}_count{_labels(base)} {w.count}")
        if self.latency.histograms:
            name = "nv_inference_first_response_histogram_ms"
            _family(lines, name, "histogram", "Duration from request to first response in milliseconds")
            for mv in measured:
                h = mv.stats.latency.first_response if mv.stats.latency is not None else None
                if h is None:
                    continue
                base = labels[id(mv)]
                for le, n in h.cumulative():
                    lines.append(f"{name}_bucket{_labels([*base, ('le', le)])} {n}")
                lines.append(f"{name}_sum{_labels(base)} {number(h.sum)}")
                lines.append(f"{name}_count{_labels(base)} {h.count}")


def _family(lines: list[str], name: str, kind: str, text: str) -> None:
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")
