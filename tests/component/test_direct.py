"""``DirectScheduler`` in process: each request goes alone to the pool (which picks the
instance), its error is raised, and admission and statistics are kept."""

from __future__ import annotations

import pytest

from shoal.proto.errors import ErrorCode, ModelNotReady, ServingError
from shoal.server.scheduling.direct import DirectScheduler
from shoal.server.stats import ModelStats
from shoal.server.types import InferResult
from tests.component.fakes import Harness, error_of, request, result_of, settle


async def test_each_request_runs_alone_on_the_instance_the_pool_picks(h: Harness) -> None:
    pool = h.pool(2, hold=True)
    stats = ModelStats("d", 1)
    direct = h.own(DirectScheduler(pool.as_pool(), stats))
    tasks = [h.spawn(direct.submit(request(n))) for n in "ab"]
    await settle()
    assert [c.ids for c in pool.calls] == [["a"], ["b"]]
    assert [c.worker.spec.instance_name for c in pool.calls] == ["instance0", "instance1"]
    assert direct.inflight == 2 and direct.pending == 0
    for call in pool.calls:
        call.finish()
    await settle()
    assert [result_of(t).id for t in tasks] == ["a", "b"]
    assert direct.inflight == 0
    assert stats.durations["success"].count == 2 and stats.durations["queue"].ns == 0


async def test_an_error_result_is_raised_and_counted(h: Harness) -> None:
    pool = h.pool(respond=lambda r: ServingError("bad input", code=ErrorCode.INVALID_ARGUMENT))
    stats = ModelStats("d", 1)
    direct = h.own(DirectScheduler(pool.as_pool(), stats))
    task = h.spawn(direct.submit(request("a")))
    await settle()
    assert error_of(task).message == "bad input"
    assert stats.durations["fail"].count == 1 and stats.durations["success"].count == 0
    assert direct.inflight == 0


async def test_a_failed_execution_is_raised(h: Harness) -> None:
    pool = h.pool()
    pool.workers[0].ready = False
    direct = h.own(DirectScheduler(pool.as_pool()))  # statistics are optional
    task = h.spawn(direct.submit(request("a")))
    await settle()
    assert isinstance(error_of(task), ModelNotReady) and direct.inflight == 0


async def test_drain_waits_for_requests_in_flight_and_refuses_new_ones(h: Harness) -> None:
    pool = h.pool(hold=True)
    direct = h.own(DirectScheduler(pool.as_pool()))
    task = h.spawn(direct.submit(request("a")))
    await settle()
    drain = h.spawn(direct.drain(60.0))
    await settle()
    with pytest.raises(ServingError) as ei:
        await direct.submit(request("late"))
    assert ei.value.code is ErrorCode.UNAVAILABLE
    assert not drain.done()
    pool.calls[0].finish()
    await settle()
    assert drain.done() and isinstance(result_of(task), InferResult) and len(pool.calls) == 1
