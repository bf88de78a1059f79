"""The rate limiter alone: resources bound concurrent executions across instances, waiting
batches take turns by priority, cancelled waiters leave nothing held."""

from __future__ import annotations

import asyncio

import pytest

from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.dispatch.ratelimit import RateLimiter
from shoal.server.optionvalues import RateLimitResource


def _limits(*resources: tuple[str, int, bool], priority: int = 0) -> mc.ModelRateLimiter:
    rl = mc.ModelRateLimiter(priority=priority)
    for name, count, is_global in resources:
        r = rl.resources.add(name=name, count=count)
        setattr(r, "global", is_global)
    return rl


def test_instances_sharing_a_resource_take_turns_by_priority() -> None:
    async def main() -> list[str]:
        rl = RateLimiter()
        fast = rl.needs(_limits(("R", 1, False), priority=1), device=-1)
        slow = rl.needs(_limits(("R", 1, False), priority=2), device=-1)
        order: list[str] = []
        await rl.acquire(fast)  # holds R: everyone else waits

        async def one(name: str, needs: object) -> None:
            await rl.acquire(needs)  # type: ignore[arg-type]
            order.append(name)
            await asyncio.sleep(0)
            rl.release(needs)  # type: ignore[arg-type]

        tasks = [asyncio.ensure_future(one("fast", fast)) for _ in range(12)]
        tasks += [asyncio.ensure_future(one("slow", slow)) for _ in range(12)]
        await asyncio.sleep(0)
        rl.release(fast)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    first = order[:12]
    # while both wait, priority 1 gets two turns for each of priority 2's
    assert 7 <= first.count("fast") <= 9, order
    assert sorted(order) == ["fast"] * 12 + ["slow"] * 12


def test_a_resource_bounds_concurrency_and_devices_are_separate() -> None:
    async def main() -> None:
        rl = RateLimiter((RateLimitResource("R", 2, 0),))
        a = rl.needs(_limits(("R", 1, False)), device=0)
        b = rl.needs(_limits(("R", 1, False)), device=0)
        c = rl.needs(_limits(("R", 1, False)), device=0)
        other = rl.needs(_limits(("R", 1, False)), device=1)
        await rl.acquire(a)
        await rl.acquire(b)
        waiting = asyncio.ensure_future(rl.acquire(c))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await asyncio.wait_for(rl.acquire(other), 1)  # device 1 has its own R (the most needed: 1)
        rl.release(a)
        await asyncio.wait_for(waiting, 1)

    asyncio.run(main())


def test_cancelled_waiters_hold_nothing() -> None:
    async def main() -> None:
        rl = RateLimiter()
        g = rl.needs(_limits(("G", 1, True)), device=0)
        h = rl.needs(_limits(("G", 1, True)), device=1)  # global: shared across devices
        await rl.acquire(g)
        waiter = asyncio.ensure_future(rl.acquire(h))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        rl.release(g)
        await asyncio.wait_for(rl.acquire(h), 1)

    asyncio.run(main())


def test_a_configured_count_below_an_instances_need_fails_its_load() -> None:
    rl = RateLimiter((RateLimitResource("R", 1),))
    with pytest.raises(InvalidInput, match='Resource count for "R" is limited to 1 which will prevent scheduling'):
        rl.needs(_limits(("R", 2, False)), device=-1)
