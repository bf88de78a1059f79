"""``BatchQueue``: the dynamic batcher's policy, free of asyncio and of the clock (every
call takes ``now`` in nanoseconds), so it is tested with an injected clock.

Triton's rules (``model_config.proto`` ``ModelDynamicBatching``, ``docs/user_guide/batcher.md``):
- Requests wait in one queue per priority level (level 1 is the highest); a batch takes
  them in priority order, then arrival order, while they fit in ``max_batch_size`` and
  their shapes can share a batch (equal non-batch dimensions, except inputs that allow
  ragged batching).
- A batch of ``max_batch_size`` goes at once; otherwise the largest preferred batch size
  that the queue can fill exactly goes at once; otherwise the batch waits until its oldest
  request has waited ``max_queue_delay_microseconds``, then goes as it is.
- Queue policy per level: ``max_queue_size`` (0 = unbounded) rejects at enqueue;
  a request that waited past its timeout is rejected (``REJECT``) or moved behind every
  request that has not timed out (``DELAY``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc

REJECT = mc.ModelQueuePolicy.REJECT
DELAY = mc.ModelQueuePolicy.DELAY


@dataclass(slots=True)
class Policy:
    timeout_action: int = REJECT
    default_timeout_ns: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0

    @classmethod
    def from_config(cls, p: mc.ModelQueuePolicy) -> Policy:
        return cls(
            timeout_action=p.timeout_action,
            default_timeout_ns=p.default_timeout_microseconds * 1000,
            allow_timeout_override=p.allow_timeout_override,
            max_queue_size=p.max_queue_size,
        )


@dataclass(slots=True, eq=False)
class Item:
    payload: Any
    size: int
    """Batch elements this request contributes (its dimension 0)."""
    shape_key: Hashable
    enqueued_ns: int
    level: int = 1
    deadline_ns: int = 0
    """0: no timeout."""
    seq: int = 0
    error: ServingError | None = field(default=None)
    request_id: str = ""
    """The request's ``id`` (errors name it, as Triton's do)."""


@dataclass(slots=True)
class BatchConfig:
    max_batch_size: int
    preferred: tuple[int, ...] = ()
    max_delay_ns: int = 0
    priority_levels: int = 0
    default_level: int = 0
    default_policy: Policy = field(default_factory=Policy)
    level_policies: dict[int, Policy] = field(default_factory=dict)
    preserve_ordering: bool = False

    @classmethod
    def from_config(cls, cfg: mc.ModelConfig) -> BatchConfig:
        db = cfg.dynamic_batching
        levels = int(db.priority_levels)
        return cls(
            max_batch_size=max(1, cfg.max_batch_size),
            preferred=tuple(sorted({int(p) for p in db.preferred_batch_size if 0 < p <= cfg.max_batch_size})),
            max_delay_ns=int(db.max_queue_delay_microseconds) * 1000,
            priority_levels=levels,
            default_level=int(db.default_priority_level) if levels else 0,
            default_policy=Policy.from_config(db.default_queue_policy),
            level_policies={int(k): Policy.from_config(v) for k, v in db.priority_queue_policy.items()},
            preserve_ordering=db.preserve_ordering,
        )


class BatchQueue:
    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        n = max(1, config.priority_levels)
        self._queues: list[deque[Item]] = [deque() for _ in range(n)]
        self._delayed: list[deque[Item]] = [deque() for _ in range(n)]
        self._seq = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues) + sum(len(q) for q in self._delayed)

    def policy(self, level: int) -> Policy:
        return self.config.level_policies.get(level, self.config.default_policy)

    def level_of(self, priority: int) -> int:
        """The queue level of a request's ``priority`` parameter (0: the default level)."""
        levels = self.config.priority_levels
        if levels == 0:
            return 1
        if priority == 0:
            return self.config.default_level or 1
        if priority > levels:
            raise InvalidInput(f"request priority {priority} is outside the model's priority levels 1..{levels}")
        return priority

    def add(self, item: Item, now: int, timeout_us: int | None = None) -> None:
        """Queue ``item``; raises ``QueueFull`` (Triton's UNAVAILABLE) when its level is at
        ``max_queue_size``."""
        policy = self.policy(item.level)
        index = item.level - 1
        if policy.max_queue_size and len(self._queues[index]) + len(self._delayed[index]) >= policy.max_queue_size:
            raise T.QUEUE_FULL(item.request_id)
        timeout_ns = policy.default_timeout_ns
        if timeout_us is not None and timeout_us > 0 and policy.allow_timeout_override:
            timeout_ns = timeout_us * 1000
        item.deadline_ns = now + timeout_ns if timeout_ns else 0
        item.enqueued_ns = now
        self._seq += 1
        item.seq = self._seq
        self._queues[index].append(item)

    def expire(self, now: int) -> list[Item]:
        """Requests past their deadline: REJECT ones are removed and returned (with their
        error set); DELAY ones move behind the requests that are still on time."""
        rejected: list[Item] = []
        for index, q in enumerate(self._queues):
            if not any(i.deadline_ns and i.deadline_ns <= now for i in q):
                continue
            keep: deque[Item] = deque()
            for item in q:
                if item.deadline_ns and item.deadline_ns <= now:
                    if self.policy(index + 1).timeout_action == DELAY:
                        self._delayed[index].append(item)
                    else:
                        item.error = T.QUEUE_TIMEOUT()
                        rejected.append(item)
                else:
                    keep.append(item)
            self._queues[index] = keep
        return rejected

    def _ordered(self) -> list[Item]:
        out: list[Item] = []
        for q in self._queues:
            out.extend(q)
        for q in self._delayed:
            out.extend(q)
        return out

    def next_batch(self, now: int) -> tuple[list[Item], int]:
        """``(batch, 0)`` when a batch should go now; ``([], wake_ns)`` otherwise, where
        ``wake_ns`` is when to ask again (0: only when something is added)."""
        items = self._ordered()
        if not items:
            return [], 0
        cfg = self.config
        take: list[Item] = []
        total = 0
        sums: list[int] = []
        key = items[0].shape_key
        for item in items:
            if item.shape_key != key or total + item.size > cfg.max_batch_size:
                break
            take.append(item)
            total += item.size
            sums.append(total)
        if not take:  # a request larger than max_batch_size cannot get here (validated)
            take, sums = [items[0]], [items[0].size]
        full = len(take) < len(items) or total >= cfg.max_batch_size
        chosen = len(take)
        if not full and cfg.preferred:
            best = [n for n, s in enumerate(sums, 1) if s == max((p for p in cfg.preferred if p <= total), default=-1)]
            if best:
                chosen = best[-1]
                full = True
        oldest = min(i.enqueued_ns for i in take)
        if full or cfg.max_delay_ns == 0 or now - oldest >= cfg.max_delay_ns:
            batch = take[:chosen]
            self._remove(batch)
            return batch, 0
        return [], oldest + cfg.max_delay_ns

    def next_deadline(self) -> int:
        deadlines = [i.deadline_ns for q in self._queues for i in q if i.deadline_ns]
        return min(deadlines, default=0)

    def _remove(self, batch: list[Item]) -> None:
        gone = {id(i) for i in batch}
        for qs in (self._queues, self._delayed):
            for index, q in enumerate(qs):
                if any(id(i) in gone for i in q):
                    qs[index] = deque(i for i in q if id(i) not in gone)

    def remove(self, item: Item) -> bool:
        """Take one request out (its client went away); False if it is not queued."""
        for qs in (self._queues, self._delayed):
            for q in qs:
                if item in q:
                    q.remove(item)
                    return True
        return False

    def drain_all(self) -> list[Item]:
        items = self._ordered()
        for q in self._queues:
            q.clear()
        for q in self._delayed:
            q.clear()
        return items
