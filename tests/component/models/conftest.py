from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.component.models.harness import MakeEnv, ModelEnv


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[MakeEnv]:
    """Builds ``ModelEnv``s (keywords: its settings); each is stopped afterwards, and the test
    fails if a worker process, an input block or a /dev/shm segment is left behind."""
    envs: list[ModelEnv] = []

    def make(**settings: Any) -> ModelEnv:
        env = ModelEnv(tmp_path / f"env{len(envs)}", **settings)
        envs.append(env)
        return env

    try:
        yield make
    finally:
        problems = [p for env in envs for p in await env.close()]
    assert not problems, "; ".join(problems)


@pytest.fixture
async def env(make_env: MakeEnv) -> ModelEnv:
    """A ``ModelEnv`` in explicit mode with the default settings."""
    return make_env()
