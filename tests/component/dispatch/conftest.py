from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.component.dispatch.harness import Harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A started channel, input arena and mapper; every worker added is stopped afterwards, and
    the test fails if a process, an input block or a /dev/shm segment is left behind."""
    h = Harness(tmp_path)
    h.start()
    try:
        yield h
    finally:
        problems = await h.close()
    assert not problems, "; ".join(problems)
