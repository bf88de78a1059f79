"""The harness every component test gets: it drains the schedulers and cancels the tasks
a test leaves behind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.component.fakes import Harness


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.close()
