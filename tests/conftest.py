"""Fixtures shared by every test layer: shared-memory leak checks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def shoal_segments() -> set[str]:
    """Segments of Shoal servers and of the client regions tests create (``shoaltest_``)."""
    try:
        mine = f"shoaltest_{os.getpid()}_"  # client regions of this test process only
        return {n for n in os.listdir("/dev/shm") if n.startswith(("shoal_", mine))}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it (segments of servers that are still
    running in a wider-scoped fixture are allowed to persist)."""
    before = shoal_segments()
    yield
    leaked = shoal_segments() - before
    # segments of module-scoped servers that a test merely caused to grow stay with
    # their (live) server and are checked when it stops
    from shoal.shm.region import _RUN_RE, SHM_DIR, is_held, lock_name

    leaked = {n for n in leaked if not ((m := _RUN_RE.match(n)) and is_held(str(SHM_DIR / lock_name(m.group(1)))))}
    assert not leaked, f"shared memory leaked: {sorted(leaked)}"
