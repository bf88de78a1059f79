"""``BatchQueue`` with an injected clock (no sleeps): preferred sizes, delay, shapes,
priorities, timeouts, queue limits."""

from __future__ import annotations

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.scheduling.batchqueue import DELAY, REJECT, BatchConfig, BatchQueue, Item, Policy

MS = 1_000_000


def _item(name: str, size: int = 1, shape: object = (3,), level: int = 1) -> Item:
    return Item(payload=name, size=size, shape_key=shape, enqueued_ns=0, level=level)


def _names(batch: list[Item]) -> list[str]:
    return [i.payload for i in batch]


def test_no_delay_sends_what_is_there() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8))
    q.add(_item("a"), 0)
    q.add(_item("b", 2), 0)
    batch, wake = q.next_batch(0)
    assert _names(batch) == ["a", "b"] and wake == 0 and len(q) == 0
    assert q.next_batch(0) == ([], 0)


def test_delay_waits_for_the_oldest() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, max_delay_ns=10 * MS))
    q.add(_item("a"), 0)
    q.add(_item("b"), 4 * MS)
    assert q.next_batch(5 * MS) == ([], 10 * MS)
    batch, _ = q.next_batch(10 * MS)
    assert _names(batch) == ["a", "b"]


def test_full_batch_goes_at_once_and_overflow_waits() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=4, max_delay_ns=10 * MS))
    for n in "abcde":
        q.add(_item(n), 0)
    batch, _ = q.next_batch(1)
    assert _names(batch) == ["a", "b", "c", "d"]
    assert q.next_batch(2) == ([], 10 * MS)


def test_preferred_size_goes_at_once() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, preferred=(2, 4), max_delay_ns=100 * MS))
    q.add(_item("a"), 0)
    assert q.next_batch(1) == ([], 100 * MS)
    for n in "bcde":
        q.add(_item(n), 1)
    batch, _ = q.next_batch(2)  # 5 queued: the largest preferred size it can fill is 4
    assert _names(batch) == ["a", "b", "c", "d"]
    assert q.next_batch(3) == ([], 100 * MS + 1)  # "e" came at t=1


def test_preferred_size_needs_an_exact_fill() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, preferred=(4,), max_delay_ns=100 * MS))
    q.add(_item("a", 3), 0)
    q.add(_item("b", 3), 0)  # 3 + 3: no prefix sums to 4
    assert q.next_batch(1) == ([], 100 * MS)
    batch, _ = q.next_batch(100 * MS)
    assert _names(batch) == ["a", "b"]


def test_different_shapes_never_share_a_batch() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, max_delay_ns=10 * MS))
    q.add(_item("a", shape=(3,)), 0)
    q.add(_item("b", shape=(5,)), 0)
    q.add(_item("c", shape=(3,)), 0)
    batch, _ = q.next_batch(0)  # "b" cannot join, so "a" goes alone (order is kept)
    assert _names(batch) == ["a"]
    batch, _ = q.next_batch(0)
    assert _names(batch) == ["b"]
    assert q.next_batch(0) == ([], 10 * MS)


def test_priorities() -> None:
    cfg = BatchConfig(max_batch_size=2, priority_levels=3, default_level=2)
    q = BatchQueue(cfg)
    assert q.level_of(0) == 2 and q.level_of(1) == 1 and q.level_of(3) == 3
    with pytest.raises(ServingError, match="priority 4 is outside"):
        q.level_of(4)
    q.add(_item("low", level=3), 0)
    q.add(_item("mid", level=2), 1)
    q.add(_item("high", level=1), 2)
    batch, _ = q.next_batch(3)
    assert _names(batch) == ["high", "mid"]
    assert BatchQueue(BatchConfig(max_batch_size=2)).level_of(7) == 1  # no levels: priority ignored


def test_max_queue_size_per_level() -> None:
    cfg = BatchConfig(
        max_batch_size=8, priority_levels=2, default_level=2, level_policies={1: Policy(max_queue_size=1)}
    )
    q = BatchQueue(cfg)
    q.add(_item("a", level=1), 0)
    with pytest.raises(ServingError) as err:
        q.add(_item("b", level=1), 0)
    # Triton's text and code (UNAVAILABLE: HTTP 503)
    assert err.value.message == "[request id: <id_unknown>] Exceeds maximum queue size"
    assert err.value.code is ErrorCode.UNAVAILABLE
    q.add(_item("c", level=2), 0)  # level 2 is unbounded


def test_timeouts_reject_and_override() -> None:
    cfg = BatchConfig(
        max_batch_size=8,
        max_delay_ns=100 * MS,
        default_policy=Policy(timeout_action=REJECT, default_timeout_ns=5 * MS, allow_timeout_override=True),
    )
    q = BatchQueue(cfg)
    q.add(_item("a"), 0)
    q.add(_item("b"), 0, timeout_us=50_000)  # overrides the default 5 ms
    assert q.next_deadline() == 5 * MS
    assert q.expire(4 * MS) == []
    (gone,) = q.expire(5 * MS)
    assert gone.payload == "a" and gone.error is not None and gone.error.code is ErrorCode.UNAVAILABLE
    assert gone.error.message == "Request timeout expired"
    assert _names(q.next_batch(100 * MS)[0]) == ["b"]


def test_timeout_override_needs_permission() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, default_policy=Policy(default_timeout_ns=0)))
    q.add(_item("a"), 0, timeout_us=1)
    assert q.next_deadline() == 0 and q.expire(10**12) == []


def test_delay_action_moves_late_requests_back() -> None:
    cfg = BatchConfig(max_batch_size=1, default_policy=Policy(timeout_action=DELAY, allow_timeout_override=True))
    q = BatchQueue(cfg)
    q.add(_item("late"), 0, timeout_us=1)
    q.add(_item("ontime"), 0)
    assert q.expire(1000) == []
    assert _names(q.next_batch(1000)[0]) == ["ontime"]
    assert _names(q.next_batch(1000)[0]) == ["late"]


def test_remove_and_drain() -> None:
    q = BatchQueue(BatchConfig(max_batch_size=8, max_delay_ns=MS))
    a, b = _item("a"), _item("b")
    q.add(a, 0)
    q.add(b, 0)
    assert q.remove(a) and not q.remove(a)
    assert _names(q.drain_all()) == ["b"] and len(q) == 0


def test_from_config() -> None:
    cfg = mc.ModelConfig(max_batch_size=8)
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend([4, 2, 16])
    db.max_queue_delay_microseconds = 250
    db.priority_levels = 2
    db.default_priority_level = 2
    db.default_queue_policy.max_queue_size = 3
    db.priority_queue_policy[1].timeout_action = DELAY
    db.priority_queue_policy[1].default_timeout_microseconds = 7
    bc = BatchConfig.from_config(cfg)
    assert bc.preferred == (2, 4) and bc.max_delay_ns == 250_000
    assert bc.default_policy.max_queue_size == 3
    assert bc.level_policies[1].timeout_action == DELAY and bc.level_policies[1].default_timeout_ns == 7000
