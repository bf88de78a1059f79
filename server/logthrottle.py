"""Client errors in the log: at verbose level only, and at most a few lines a second.

A malformed request is the client's problem, not the operator's: it must not put an ERROR
line in the log, and a client sending thousands of them must not flood it.
"""

from __future__ import annotations

import logging
import time

from shoal.proto.errors import ServingError

_PER_SECOND = 10


class Throttle:
    """At most ``per_second`` lines a second; the next line after a pause says how many
    were dropped."""

    def __init__(self, per_second: int = _PER_SECOND) -> None:
        self.per_second = per_second
        self._window = 0.0
        self._count = 0
        self.dropped = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count > self.per_second:
            self.dropped += 1
            return False
        return True


_client = Throttle()


def client_error(log: logging.Logger, exc: ServingError, where: str) -> None:
    """Log a request's error at DEBUG (``--log-verbose``), rate-limited."""
    if not log.isEnabledFor(logging.DEBUG) or not _client.allow():
        return
    dropped, _client.dropped = _client.dropped, 0
    more = f" ({dropped} similar lines dropped)" if dropped else ""
    log.debug("%s: %s: %s%s", where[:200], exc.code.name, exc.message[:500], more)
