"""Decoupled batches through ``InstancePool`` and ``Worker``: responses reach each request's sink
in order, the batch's inputs stay allocated until every request is final, and a worker that
dies mid-stream ends the open requests with its death."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.proto.errors import ServingError, WorkerDied
from shoal.server.types import InferRequest, InferResult
from tests.component.dispatch.harness import INLINE_MAX, Harness, eventually, out_bytes, request

pytestmark = pytest.mark.timeout(30)

BIG = b"B" * (INLINE_MAX + 1)


def streaming(*inputs: bytes, rid: str = "") -> tuple[InferRequest, list[tuple[Any, bool]]]:
    req = request(*inputs, rid=rid)
    got: list[tuple[Any, bool]] = []

    def sink(item: InferResult | ServingError | None, final: bool) -> None:
        got.append((out_bytes(item) if isinstance(item, InferResult) else item, final))
        if isinstance(item, InferResult):
            item.done()

    req.responses = sink
    return req, got


@pytest.mark.parametrize("final_alone", [False, True])
async def test_responses_reach_each_request_in_order(harness: Harness, final_alone: bool) -> None:
    fake = await harness.started({"infer_default": {"stream": {"n": 3, "final_alone": final_alone}}})
    pool = harness.pool(fake)
    (a, got_a), (b, got_b) = streaming(b"a"), streaming(b"b")
    results = await pool.run([a, b])
    assert [r.outputs for r in results if isinstance(r, InferResult)] == [[], []]  # all went to the sinks
    await eventually(lambda: bool(got_a and got_a[-1][1] and got_b and got_b[-1][1]), "both final")
    want = [(b"a\x00", False), (b"a\x01", False), (b"a\x02", not final_alone)] + ([(None, True)] if final_alone else [])
    assert got_a == want
    assert [item for item, _ in got_b[:3]] == [b"b\x00", b"b\x01", b"b\x02"]
    assert fake.worker.outstanding == 0


async def test_inputs_stay_until_every_request_is_final(harness: Harness) -> None:
    gate = harness.gate()
    fake = await harness.started({"infer_default": {"stream": {"n": 2, "after_done": True, "gate": gate}}})
    pool = harness.pool(fake)
    req, got = streaming(BIG)  # its input goes through the router's arena
    await pool.run([req])  # execute "returned": the InferDone came first
    assert fake.worker.outstanding == 0  # free for the next batch
    assert harness.arena.stats().live_blocks == 1  # but the input is still being read
    harness.open_gate(gate)
    await eventually(lambda: bool(got) and got[-1][1], "the final response")
    await eventually(lambda: harness.arena.stats().live_blocks == 0, "the input to be freed")
    assert [item[-1] for item, _ in got] == [0, 1]


async def test_a_worker_dying_mid_stream_ends_the_open_requests(harness: Harness) -> None:
    fake = await harness.started({"infer_default": {"stream": {"n": 5, "after_done": True, "die_after": 2}}})
    pool = harness.pool(fake)
    req, got = streaming(BIG)
    await pool.run([req])
    await eventually(lambda: bool(got) and got[-1][1], "the stream to end")
    assert [item[-1] for item, _ in got[:2]] == [0, 1]
    last, final = got[-1]
    assert final and isinstance(last, WorkerDied) and "exited with status 3" in last.message
    await eventually(lambda: harness.arena.stats().live_blocks == 0, "the input to be freed")
