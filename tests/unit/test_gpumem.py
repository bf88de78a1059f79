"""``--model-load-gpu-limit``: the option's values (Triton's texts) and the check a GPU worker
makes once its backend has loaded (``workers/gpumem.py``; on a GPU: tests/gpu/test_load_gpu_limit.py)."""

from __future__ import annotations

import argparse

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server import optionvalues
from shoal.workers.gpumem import check_load_limit

GIB = 1 << 30


def _limits(*values: str) -> tuple[tuple[tuple[int, float], ...], list[str]]:
    problems: list[str] = []
    out = optionvalues.gpu_load_limits(argparse.Namespace(model_load_gpu_limit=list(values)), problems)
    return out, problems


def test_values_per_device_the_last_one_counting() -> None:
    assert _limits("1:0.5", "0:0.9", "1:0.25") == (((0, 0.9), (1, 0.25)), [])
    assert _limits() == ((), [])


def test_bad_values_get_tritons_texts() -> None:
    assert _limits("0.5")[1] == [
        "Cannot parse pair option due to incorrect number of inputs.--<pair option> argument requires format "
        "<first>:<second>. Found: 0.5"
    ]
    assert _limits("x:0.5", "0:y")[1] == ["Invalid option value. Got x", "Invalid option value. Got y"]


def test_the_instance_that_leaves_more_in_use_is_refused() -> None:
    check_load_limit("m_0", 3, 0.5, lambda: (GIB // 2, GIB))  # exactly half in use: allowed, as Triton
    with pytest.raises(ServingError) as err:
        check_load_limit("m_0", 3, 0.5, lambda: (GIB // 2 - 1, GIB))
    assert err.value.code == ErrorCode.UNAVAILABLE
    assert err.value.message == (
        "can not create model 'm_0': memory limit set for GPU 3 has exceeded, model loading is rejected."
    )
