"""The status page's numbers (``GET /v2/status``; ``GET /`` is the page itself,
``server.statuspage``): models and their states, workers, queue depth, recent load failures
and worker exits, and per model a history of throughput, failures, latency (p50, p99, mean)
and queue depth.

The history costs the inference path nothing new but one reservoir append per request
(``ModelStats.recent``): every ``interval_s`` (5 s) a task on the router's loop reads the
statistics counters the router keeps anyway, takes each model's latency sample, and appends
one point per model to a ring of ``history_s`` (10 minutes). Serving the JSON reads those
rings and the registry; nothing is computed per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from shoal.server import events
from shoal.server.models import ModelManager

if TYPE_CHECKING:
    from shoal.server.dataplane import DataPlane

log = logging.getLogger("shoal.status")

INTERVAL_S = 5.0
HISTORY_S = 600.0
SERIES = ("t", "rps", "failures", "p50_ms", "p99_ms", "avg_ms", "pending")
"""One point: unix time; requests answered and failed per second; latency of the successful
ones (null when there were none); requests waiting in the scheduler at the end."""


def _interval_from_env() -> float:
    """``SHOAL_STATUS_INTERVAL_S`` (tests): a shorter sampling interval."""
    try:
        value = float(os.environ.get("SHOAL_STATUS_INTERVAL_S", INTERVAL_S))
    except ValueError:
        return INTERVAL_S
    return value if value > 0 else INTERVAL_S


def quantile(ordered: list[int], q: float) -> int:
    """Nearest-rank quantile of a sorted, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class StatusMonitor:
    def __init__(self, models: ModelManager, *, interval_s: float = 0.0, history_s: float = HISTORY_S) -> None:
        self.models = models
        self.interval_s = interval_s or _interval_from_env()
        self.history_s = history_s
        self.points = max(2, int(history_s / self.interval_s))
        self.series: dict[str, dict[str, deque[Any]]] = {}
        """model -> SERIES name -> ring of values."""
        self._previous: dict[int, tuple[int, int, int]] = {}
        """id(ModelStats) -> (successes, failures, success ns) at the last sample."""
        self._task: asyncio.Task[None] | None = None
        self.started_at = time.time()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(max(0.0, last + self.interval_s - loop.time()))
            now = loop.time()
            try:
                self.sample(now - last)
            except Exception:  # noqa: BLE001 - the status page must never stop the server
                log.exception("status sampling failed")
            last = now

    def sample(self, elapsed_s: float) -> None:
        """Append one point per model: what happened in the last ``elapsed_s`` seconds."""
        elapsed_s = max(elapsed_s, 1e-3)
        now = time.time()
        previous, self._previous = self._previous, {}
        registry = self.models.registry
        for name, versions in registry.models.items():
            if not versions:
                continue  # failed before any version loaded: no numbers
            ok = failed = ns = pending = 0
            latencies: list[int] = []
            for mv in versions.values():
                st = mv.stats
                success = st.durations["success"]
                current = (success.count, sum(st.failures.values()), success.ns)
                self._previous[id(st)] = current
                before = previous.get(id(st), (0, 0, 0))
                if current[0] < before[0] or current[1] < before[1]:
                    before = (0, 0, 0)  # not the same statistics object as last time
                ok += current[0] - before[0]
                failed += current[1] - before[1]
                ns += current[2] - before[2]
                latencies += st.recent.take()
                if mv.scheduler is not None:
                    pending += mv.scheduler.pending
            latencies.sort()
            point = (
                round(now, 3),
                round(ok / elapsed_s, 3),
                round(failed / elapsed_s, 3),
                round(quantile(latencies, 0.5) / 1e6, 3) if latencies else None,
                round(quantile(latencies, 0.99) / 1e6, 3) if latencies else None,
                round(ns / ok / 1e6, 3) if ok else None,
                pending,
            )
            rings = self.series.get(name)
            if rings is None:
                rings = self.series[name] = {k: deque(maxlen=self.points) for k in SERIES}
            for key, value in zip(SERIES, point, strict=True):
                rings[key].append(value)
        for name in [n for n in self.series if not registry.models.get(n)]:
            del self.series[name]  # unloaded, or no version left

    def snapshot(self, dp: DataPlane) -> dict[str, Any]:
        """``GET /v2/status``."""
        by_model: dict[str, int] = {}
        for name, versions in self.models.registry.models.items():
            by_model[name] = sum(mv.scheduler.pending for mv in versions.values() if mv.scheduler is not None)
        now = time.time()
        return {
            "server": {
                "id": dp.server_id,
                "version": dp.version,
                "live": dp.live(),
                "ready": dp.ready(),
                "time": round(now, 3),
                "uptime_s": round(now - self.started_at, 1),
            },
            "models": dp.repository_index(False),
            "workers": dp.workers(),
            "queue": {"pending": sum(by_model.values()), "models": by_model},
            "interval_s": self.interval_s,
            "history_s": self.history_s,
            "series": {name: {k: list(v) for k, v in rings.items()} for name, rings in sorted(self.series.items())},
            "events": events.RECENT.as_list()[::-1],
        }
