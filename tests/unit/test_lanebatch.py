"""``workers.lanebatch``: which waiting lane requests a worker batches, and how long it waits."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from google.protobuf import text_format

from shoal.proto import wire
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.inbox import take_from
from shoal.workers.lanebatch import LaneBatcher


class FakeLane:
    dead = False


class FakeInbox:
    """The backlog (``take_all``) and what ``read_now`` files meanwhile (``later``)."""

    def __init__(self) -> None:
        self.backlog: deque[Any] = deque()
        self.later: list[Any] = []
        self.waits: list[int] = []
        self.arrivals: dict[int, int] | None = None

    def take_all(self, pick: Any, full: Any) -> list[Any]:
        return take_from(self.backlog, pick, full)

    def read_now(self, timeout_ms: int) -> None:
        self.waits.append(timeout_ms)
        if self.later:
            self.backlog.append(self.later.pop(0))
        elif timeout_ms:
            time.sleep(timeout_ms / 1000)


def _config(delay_us: int = 0, preferred: str = "") -> mc.ModelConfig:
    text = (f'name: "m" max_batch_size: 8 input [ {{ name: "I" data_type: TYPE_FP32 dims: [ -1 ] }} ] '
            f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} {preferred} }}")  # fmt: skip
    return text_format.Parse(text, mc.ModelConfig())


def _item(rows: int, cols: int = 4, lane: Any = None) -> tuple[wpb.Envelope, list[bytes], Any]:
    env = wire.envelope(rows * 1000 + cols)
    ref = env.infer.requests.add().inputs.add()
    ref.name, ref.datatype = "I", "FP32"
    ref.shape.extend([rows, cols])
    return env, [], lane or FakeLane()


def test_takes_what_waits_up_to_max_batch_size_with_the_same_shapes() -> None:
    inbox = FakeInbox()
    b = LaneBatcher(_config(), inbox)  # type: ignore[arg-type]
    waiting = [_item(3), _item(1, cols=5), _item(3), _item(3), _item(2)]
    inbox.backlog.extend(waiting)
    batch = b.gather(_item(2))
    assert [tuple(e.infer.requests[0].inputs[0].shape) for e, _, _ in batch] == [(2, 4), (3, 4), (3, 4)]
    assert list(inbox.backlog) == [waiting[1], waiting[3], waiting[4]]  # the rest keep their order
    assert inbox.waits == []  # full: no look for more


def test_router_messages_and_dead_lanes_stay() -> None:
    inbox = FakeInbox()
    b = LaneBatcher(_config(), inbox)  # type: ignore[arg-type]
    dead = FakeLane()
    dead.dead = True
    router = (_item(1)[0], [], None)
    inbox.backlog.extend([router, _item(1, lane=dead)])
    assert len(b.gather(_item(1))) == 1
    assert len(inbox.backlog) == 2
    assert inbox.waits == [0]  # not full, no delay configured: one look at what has arrived, no wait


def test_waits_for_the_preferred_size_within_the_delay() -> None:
    inbox = FakeInbox()
    b = LaneBatcher(_config(delay_us=2_000_000, preferred="preferred_batch_size: 2"), inbox)  # type: ignore[arg-type]
    inbox.later = [_item(1)]
    first = _item(1)
    assert inbox.arrivals is not None
    inbox.arrivals[id(first[0])] = time.monotonic_ns()
    assert len(b.gather(first)) == 2  # the second came while it waited; 2 is the target: done
    assert len(inbox.waits) == 1


def test_a_request_that_waited_while_the_worker_was_busy_does_not_wait_again() -> None:
    inbox = FakeInbox()
    b = LaneBatcher(_config(delay_us=50_000), inbox)  # type: ignore[arg-type]
    first = _item(1)
    assert inbox.arrivals is not None
    inbox.arrivals[id(first[0])] = time.monotonic_ns() - 60_000_000  # arrived 60 ms ago
    assert len(b.gather(first)) == 1
    assert inbox.waits == []
    assert not inbox.arrivals


def test_while_the_batch_before_runs_it_gathers_until_that_is_done_then_drains() -> None:
    """``until`` (the worker's pipeline): no queue delay counts; it waits while ``until()`` is
    false, and once it is true it still takes what a read brings, until a read brings nothing."""
    inbox = FakeInbox()
    batcher = LaneBatcher(_config(delay_us=0), inbox)  # type: ignore[arg-type]
    inbox.later = [_item(1), _item(1)]
    checks = iter([False, False, True, True, True])
    batch = batcher.gather(_item(1), until=lambda: next(checks))
    assert len(batch) == 3  # two arrived while the batch before ran
    assert inbox.waits[:2] == [1, 1] and inbox.waits[-1] == 0
    inbox = FakeInbox()
    batcher = LaneBatcher(_config(delay_us=0), inbox)  # type: ignore[arg-type]
    inbox.later = [_item(1), _item(2), _item(1)]  # arrived already: the drain after "done" takes them
    batch = batcher.gather(_item(1), until=lambda: True)
    assert [b[0].infer.requests[0].inputs[0].shape[0] for b in batch] == [1, 1, 2, 1]


def test_take_from_takes_in_one_pass_and_keeps_the_rest_in_order() -> None:
    backlog = deque([1, 2, 3, 4, 5, 6, 7])
    got: list[int] = []

    def pick(x: int) -> bool:
        if x % 2:
            got.append(x)
            return True
        return False

    assert take_from(backlog, pick, lambda: len(got) >= 3) == [1, 3, 5]
    assert list(backlog) == [2, 4, 6, 7]  # 7 not looked at: full after 5
    assert take_from(backlog, lambda x: False, lambda: False) == [] and list(backlog) == [2, 4, 6, 7]
    assert take_from(deque(), pick, lambda: False) == []


def _group(*rows: int, cols: int = 4) -> tuple[wpb.Envelope, list[bytes], Any]:
    """A frontend's group: several requests in one lane message."""
    env = wire.envelope(sum(rows) * 1000 + cols)
    for i, n in enumerate(rows):
        r = env.infer.requests.add()
        r.id = i
        ref = r.inputs.add()
        ref.name, ref.datatype = "I", "FP32"
        ref.shape.extend([n, cols])
    return env, [], FakeLane()


def test_a_group_counts_its_requests_rows_and_joins_only_whole() -> None:
    """A message of several requests (``frontproc.lanelink._Group``) weighs the sum of
    their rows: it joins a batch only if all of them fit; one whose requests differ in shape
    (which a frontend never sends) is a batch of its own."""
    inbox = FakeInbox()
    b = LaneBatcher(_config(), inbox)  # type: ignore[arg-type]
    too_big, fits, mixed = _group(3, 3), _group(2, 1), _group(1, 1)
    mixed[0].infer.requests[1].inputs[0].shape[1] = 5
    inbox.backlog.extend([too_big, fits, mixed])
    batch = b.gather(_group(2, 2))  # 4 rows, max_batch_size 8
    assert batch[1] is fits and len(batch) == 2  # 4 + 3; the group of 6 rows does not fit, the mixed one never
    assert list(inbox.backlog) == [too_big, mixed]
    assert b.gather(mixed) == [mixed]
