"""Which dynamic-batching configurations a worker can batch by itself (``workers.lanebatch``):
the router then publishes the model version on lanes (``server.frontproc.lanes``), and
frontend processes and BLS callers send its requests straight to its workers, which batch
what is waiting for them, as the router's dynamic batcher would.

A worker sees only its own requests, all equal: so no priority levels or queue policies
(sizes, timeouts), no ordering guarantee across instances (``preserve_ordering``), and no
ragged inputs (the router batches those). ``max_queue_delay_microseconds`` and
``preferred_batch_size`` keep their meaning: the worker waits up to the delay for the
largest preferred size (or ``max_batch_size``) when fewer requests are waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shoal.proto.gen import model_config_pb2 as mc


def worker_batchable(config: mc.ModelConfig) -> bool:
    if config.max_batch_size <= 0 or not config.HasField("dynamic_batching"):  # (a oneof with the others)
        return False
    db = config.dynamic_batching
    if db.priority_levels > 1 or len(db.priority_queue_policy) or db.preserve_ordering:
        return False
    q = db.default_queue_policy
    if q.max_queue_size or q.default_timeout_microseconds or q.allow_timeout_override:
        return False
    return not any(i.allow_ragged_batch for i in config.input)


def batch_target(config: mc.ModelConfig) -> int:
    """The batch size a worker waits for (up to the queue delay): the largest preferred size
    that fits, else ``max_batch_size``."""
    sizes = [s for s in config.dynamic_batching.preferred_batch_size if 0 < s <= config.max_batch_size]
    return max(sizes) if sizes else config.max_batch_size


ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


class _Shaped(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


def batch_key(inputs: Sequence[_Shaped]) -> tuple[int, ShapeKey]:
    """A request's batch size and the shapes (but the batch dimension) the requests of its
    batch must share, from its inputs (a worker's ``TensorRef``s or a frontend's
    ``InputTensor``s: both sides must agree, ``workers.lanebatch`` and
    ``server.frontproc.lanes_client``); (0, ()): not batchable (no input, or a scalar)."""
    if not inputs or not inputs[0].shape:
        return 0, ()
    if len(inputs) == 1:  # the common case, without the sort
        t = inputs[0]
        return t.shape[0], ((t.name, tuple(t.shape[1:])),)
    return inputs[0].shape[0], tuple(sorted((t.name, tuple(t.shape[1:])) for t in inputs))
