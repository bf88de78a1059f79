"""A uniform sample of the request latencies of one interval (reservoir sampling, Vitter's
algorithm R): the status page's p50/p99 per model. One ``add`` per answered request, O(1);
``take`` at the end of each interval (``server.status``)."""

from __future__ import annotations

import random

SIZE = 512
"""Latencies kept per interval: p99 of 512 uniform samples is within a few ranks of the true one."""

_random = random.random


class Reservoir:
    __slots__ = ("values", "seen")

    def __init__(self) -> None:
        self.values: list[int] = []
        self.seen = 0

    def add(self, value: int) -> None:
        n = self.seen
        self.seen = n + 1
        if n < SIZE:
            self.values.append(value)
        else:
            j = int(_random() * (n + 1))
            if j < SIZE:
                self.values[j] = value

    def take(self) -> list[int]:
        """The sample since the last ``take``; starts a new one."""
        values = self.values
        self.values = []
        self.seen = 0
        return values
