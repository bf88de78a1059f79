"""Triton's rate limiter (``--rate-limit execution_count``): an instance executes a batch only
while it holds the resources its ``instance_group.rate_limiter`` names, across all models.

Resources are per device (a GPU ordinal, or -1 for CPU instances) unless ``global``. How many
of a resource exist: ``--rate-limit-resource <name>:<count>[:<device>]``, else the most any
one instance needs (so an instance alone always fits, and instances needing it take turns).
Waiting batches are granted in a fair order weighted by ``priority``: an instance of priority
2 gets half the turns of one of priority 1 while both wait (0 counts as 1). A batch whose
resources are taken holds back those behind it that need any of the same resources (so a
large request is not starved by small ones), not the others. Owned by the router's event
loop."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from shoal.proto import errortexts as T
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.optionvalues import RateLimitResource

GLOBAL = -2
"""The device key of a global resource."""


@dataclass(slots=True)
class Needs:
    """What one instance holds while it executes."""

    resources: dict[tuple[str, int], int]
    priority: int
    vtime: float = 0.0
    """Turns taken, weighted by priority (the fair order's clock)."""


@dataclass(slots=True)
class _Waiter:
    needs: Needs
    seq: int
    fut: asyncio.Future[None] = field(repr=False)


class RateLimiter:
    def __init__(self, configured: tuple[RateLimitResource, ...] = ()) -> None:
        self._configured: dict[tuple[str, int], int] = {}
        self._everywhere: dict[str, int] = {}
        for r in configured:
            if r.device < 0:
                self._everywhere[r.name] = r.count
            else:
                self._configured[(r.name, r.device)] = r.count
        self._most: dict[tuple[str, int], int] = defaultdict(int)
        self._used: dict[tuple[str, int], int] = defaultdict(int)
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    def needs(self, limiter: mc.ModelRateLimiter, device: int) -> Needs:
        """The resources of an instance on ``device`` (-1: CPU) with this configuration."""
        resources: dict[tuple[str, int], int] = {}
        for r in limiter.resources:
            k = (r.name, GLOBAL if getattr(r, "global") else device)
            resources[k] = resources.get(k, 0) + r.count
            self._most[k] = max(self._most[k], resources[k])
        for (name, dev), n in resources.items():
            limit = self.available((name, dev))
            if limit < n:
                raise T.RATE_LIMIT_TOO_FEW(name=name, limit=limit, need=n)
        clock = min((w.needs.vtime for w in self._waiting), default=0.0)
        return Needs(resources, max(1, limiter.priority), clock)

    def available(self, k: tuple[str, int]) -> int:
        """``--rate-limit-resource`` for the resource on that device (or on every device);
        else the most one instance needs."""
        if k in self._configured:
            return self._configured[k]
        if k[0] in self._everywhere:
            return self._everywhere[k[0]]
        return self._most[k]

    def _fits(self, needs: Needs) -> bool:
        return all(self._used[k] + n <= self.available(k) for k, n in needs.resources.items())

    async def acquire(self, needs: Needs) -> None:
        if not needs.resources:
            return  # an instance without resources always runs
        if not self._waiting and self._fits(needs):
            self._take(needs)
            return
        waiter = _Waiter(needs, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._grant()
        try:
            await waiter.fut
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.fut.done() and not waiter.fut.cancelled():
                self.release(needs)  # granted as we were cancelled: give it back
            raise

    def release(self, needs: Needs) -> None:
        if not needs.resources:
            return
        for k, n in needs.resources.items():
            self._used[k] -= n
        self._grant()

    def _take(self, needs: Needs) -> None:
        for k, n in needs.resources.items():
            self._used[k] += n
        needs.vtime += needs.priority

    def _grant(self) -> None:
        """Grant waiters in order; one that does not fit holds back those behind it that
        need any of the same resources (no overtaking), not the others."""
        blocked: set[tuple[str, int]] = set()
        for waiter in sorted(self._waiting, key=lambda w: (w.needs.vtime, w.seq)):
            if waiter.fut.done():  # its task was cancelled
                self._waiting.remove(waiter)
                continue
            keys = waiter.needs.resources.keys()
            if blocked.intersection(keys):
                continue
            if not self._fits(waiter.needs):
                blocked.update(keys)
                continue
            self._waiting.remove(waiter)
            self._take(waiter.needs)
            waiter.fut.set_result(None)
