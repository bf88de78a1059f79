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
