"""A worker batching the lane requests waiting for it, as the router's dynamic batcher would
(for configurations ``proto.batchpolicy.worker_batchable`` accepts; the router publishes
those versions on lanes).

DESIGN (issue 15's batching row): a dynamic-batching model's requests crossed the router,
whose batcher formed the batches: 0.77x the unbatched ceiling at c=64 with 4 frontend
processes on the device machine, where unbatched lane requests reached 1.1-1.25x. Over lanes
the requests wait in the worker's own backlog while it executes; when it is free it takes the
first and every compatible one waiting (the same shapes but the batch dimension, up to
``max_batch_size``), and if that is less than the target size (the largest preferred size,
else ``max_batch_size``) it waits for more until ``max_queue_delay_microseconds`` after the
first one arrived (as Triton counts the delay: a request that waited while the worker was
busy does not wait again; the wait is a ``poll`` of whole milliseconds, so it may end up to
1 ms late): the batches the router would have formed from the same requests. The execution
is counted by the worker (a ``LaneStat`` with ``execution``, before the answers); each
request's client counts the request (``InferDone.counted``). Measured on the device machine
(4 frontend processes, identity, HTTP c=64): 17.9k infer/s, 1.82x the router's batcher on the
same requests and 1.43x the unbatched one-process ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from shoal.proto.batchpolicy import ShapeKey, batch_key, batch_target
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.inbox import Inbox, Incoming

_NONE: Final = (0, ())
UNTIL_POLL_MS: Final = 1
"""Longest wait of one ``poll`` while gathering ``until``: ``until()`` is looked at after each
read, so under load (arrivals wake the poll) at once, and at least every millisecond."""


def _size_and_key(env: wpb.Envelope) -> tuple[int, ShapeKey]:
    """A lane message's batch size (the sum of its requests': a frontend sends the compatible
    requests of one loop turn together) and the shapes its batch must share ((0, ()): not
    batchable: no input, a scalar, or requests that differ)."""
    requests = env.infer.requests
    if not requests:
        return _NONE
    size, key = batch_key(requests[0].inputs)
    if not size:
        return _NONE
    for r in requests[1:]:
        n, k = batch_key(r.inputs)
        if not n or k != key:
            return _NONE
        size += n
    return size, key


class LaneBatcher:
    def __init__(self, config: mc.ModelConfig, inbox: Inbox) -> None:
        self.inbox = inbox
        self.max_batch = config.max_batch_size
        self.target = batch_target(config)
        self.delay_ns = config.dynamic_batching.max_queue_delay_microseconds * 1000
        self.arrivals: dict[int, int] = {}
        self.arrived: list[int] = []
        """When each request of the last ``gather`` was read (its queue time)."""
        inbox.arrivals = self.arrivals

    def gather(self, first: Incoming, *, until: Callable[[], bool] | None = None) -> list[Incoming]:
        """``first`` and the compatible lane requests waiting (or arriving within the queue
        delay) to execute with it; ``arrived`` then holds when each was read (0: unknown).
        With ``until`` (the instance is still busy with the batch before) it waits for more
        until ``until()`` is true instead, whatever the delay, and then takes what has arrived
        until a read brings nothing more."""
        arrivals = self.arrivals
        arrived = arrivals.pop(id(first[0]), 0)
        self.arrived = [arrived]
        size, key = _size_and_key(first[0])
        batch = [first]
        if not size:
            return batch
        inbox = self.inbox
        deadline = arrived + self.delay_ns if arrived else 0  # from the first one's arrival, as Triton
        looked = False

        filled = [size]  # the batch's size with the requests ``fits`` accepted
        target, max_batch = self.target, self.max_batch

        def fits(item: Incoming) -> bool:
            env, _, lane = item
            if lane is None or lane.dead or env.WhichOneof("body") != "infer":
                return False
            n, k = _size_and_key(env)
            if 0 < n <= max_batch - filled[0] and k == key:
                filled[0] += n
                return True
            return False

        def full() -> bool:
            return filled[0] >= target

        while filled[0] < target:
            items = inbox.take_all(fits, full)
            if not items:
                if until is not None and not until():
                    inbox.read_now(UNTIL_POLL_MS)
                    continue
                if until is not None or not self.delay_ns:  # what has arrived meanwhile joins
                    if looked:
                        break
                    looked = True
                    inbox.read_now(0)
                    continue
                now = time.monotonic_ns()
                if not deadline:
                    deadline = now + self.delay_ns
                if now >= deadline:
                    break
                inbox.read_now(max(1, (deadline - now) // 1_000_000))
                continue
            looked = False
            self.arrived.extend([arrivals.pop(id(item[0]), 0) for item in items])
            batch.extend(items)
        return batch
