"""Bugs found by review, each pinned by the test that showed it."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from shoal.proto.errors import InvalidInput
from shoal.server.config import ConfigError, parse
from shoal.server.frontends.http import codec
from shoal.shm.arena import Arena


def test_in_use_bytes_back_to_zero_after_free() -> None:
    arena = Arena(f"shoal_{os.getpid()}_test{secrets.token_hex(4)}", segment_bytes=4096, max_bytes=4096)
    try:
        b = arena.allocate(100)  # [0, 256) used, [256, 4096) free
        arena.free(b)  # merges with the free range that follows it
        assert arena.stats().in_use_bytes == 0
    finally:
        arena.close()


def test_fp32_json_value_out_of_range() -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e300]}]}).encode()
    with pytest.raises(InvalidInput, match="out of range for FP32"):
        codec.decode_request(body, None, "m", 1)


@pytest.mark.parametrize("value", ["1_0", " 5x", "+3", "0x10"])
def test_header_length_must_be_plain_digits(value: str) -> None:
    with pytest.raises(InvalidInput):
        codec.parse_header_length(value, 100)


def test_bad_integer_is_a_config_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(["serve", "--model-repository", str(tmp_path), "--http-port", "abc", "--grpc-port", "-1"])
    assert len(ei.value.problems) == 2
