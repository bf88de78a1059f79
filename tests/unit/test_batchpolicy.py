"""``proto.batchpolicy``: which dynamic batchers a worker runs itself for lane requests."""

from __future__ import annotations

from google.protobuf import text_format

from shoal.proto.batchpolicy import batch_target, worker_batchable
from shoal.proto.gen import model_config_pb2 as mc


def _config(text: str) -> mc.ModelConfig:
    base = 'name: "m" max_batch_size: 8 input [ { name: "I" data_type: TYPE_FP32 dims: [ -1 ] } ] '
    return text_format.Parse(base + text, mc.ModelConfig())


def test_plain_dynamic_batchers_are_the_workers() -> None:
    assert worker_batchable(_config("dynamic_batching { }"))
    assert worker_batchable(
        _config("dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [2, 4] }")
    )
    assert worker_batchable(_config("dynamic_batching { priority_levels: 1 }"))


def test_what_only_the_router_does_stays_there() -> None:
    assert not worker_batchable(_config(""))
    assert not worker_batchable(_config("dynamic_batching { priority_levels: 2 default_priority_level: 1 }"))
    assert not worker_batchable(_config("dynamic_batching { preserve_ordering: true }"))
    assert not worker_batchable(_config("dynamic_batching { default_queue_policy { max_queue_size: 4 } }"))
    assert not worker_batchable(
        _config("dynamic_batching { default_queue_policy { default_timeout_microseconds: 9 } }")
    )
    assert not worker_batchable(_config("dynamic_batching { default_queue_policy { allow_timeout_override: true } }"))
    ragged = _config("dynamic_batching { }")
    ragged.input[0].allow_ragged_batch = True
    assert not worker_batchable(ragged)
    unbatched = _config("dynamic_batching { }")
    unbatched.max_batch_size = 0
    assert not worker_batchable(unbatched)


def test_the_target_is_the_largest_preferred_size_that_fits() -> None:
    assert batch_target(_config("dynamic_batching { }")) == 8
    assert batch_target(_config("dynamic_batching { preferred_batch_size: [2, 4] }")) == 4
    assert batch_target(_config("dynamic_batching { preferred_batch_size: [16] }")) == 8
