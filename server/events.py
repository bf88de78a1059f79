"""Recent trouble, for the status page: the last ``MAX_EVENTS`` model load failures and
worker processes that ended unexpectedly (crashed, killed, hung), newest last. Kept in the
router's memory only (the log has every one of them)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_EVENTS = 50

LOAD_FAILED = "load failed"
WORKER_EXITED = "worker exited"
RESTART_FAILED = "restart failed"


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    """Unix time."""
    kind: str
    model: str
    version: str
    """"" when no version was reached (the model's configuration failed)."""
    instance: str
    pid: int
    message: str


class EventLog:
    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=maxlen)

    def add(self, kind: str, model: str, message: str, *, version: int = -1, instance: str = "", pid: int = 0) -> None:
        version_text = str(version) if version >= 0 else ""
        self._events.append(Event(time.time(), kind, model, version_text, instance, pid, message))

    def as_list(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self._events]

    def clear(self) -> None:
        self._events.clear()


RECENT = EventLog()
"""The router's events (one router per process)."""
