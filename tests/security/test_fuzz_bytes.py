"""Fuzzing of the BYTES tensor deserializer (``dtypes.deserialize_bytes``): random and
well-formed buffers, damaged or typed as 32-bit words, with counts small, wrong or huge; each
call either round-trips the buffer or refuses it with ``InvalidInput``, under ``bounded``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shoal.proto import dtypes
from shoal.proto.errors import InvalidInput, ServingError
from tests.security.fuzz_values import BYTES_COUNTS, length_prefixed
from tests.security.fuzzing import bounded, fuzz


def _check_deserialize(buffer: bytes | bytearray | memoryview, count: int) -> None:
    out = bounded(lambda: dtypes.deserialize_bytes(buffer, count, name="t"), len(buffer), "deserialize_bytes")
    if isinstance(out, ServingError):
        assert isinstance(out, InvalidInput)
        return
    assert out.shape == (count,) and out.dtype == np.object_
    assert all(type(b) is bytes for b in out.tolist())
    assert length_prefixed(out.tolist()) == bytes(buffer)


@fuzz(300)
@given(buffer=st.binary(max_size=128), count=BYTES_COUNTS, kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
@example(buffer=b"", count=0, kind="bytes")
@example(buffer=b"\x00\x00\x00\x00", count=2**40, kind="bytes")
@example(buffer=b"\xff\xff\xff\xff" + bytes(12), count=4, kind="memoryview")
def test_deserialize_bytes_random(buffer: bytes, count: int, kind: str) -> None:
    buf: bytes | bytearray | memoryview = buffer
    if kind == "bytearray":
        buf = bytearray(buffer)
    elif kind == "memoryview":
        buf = memoryview(buffer)
    _check_deserialize(buf, count)


@fuzz(300)
@given(
    items=st.lists(st.binary(max_size=12), max_size=12),
    delta=st.one_of(st.just(0), st.integers(-3, 3), st.sampled_from([2**31, 2**40])),
    cut=st.integers(0, 3),
    extra=st.binary(max_size=3),
)
def test_deserialize_bytes_well_formed(items: list[bytes], delta: int, cut: int, extra: bytes) -> None:
    """Well-formed buffers round-trip; a wrong count, a cut or trailing bytes are refused."""
    buffer = length_prefixed(items)
    if delta == 0 and not extra and cut == 0:
        assert dtypes.deserialize_bytes(buffer, len(items)).tolist() == items
    damaged = (buffer[: len(buffer) - cut] if cut else buffer) + extra
    _check_deserialize(damaged, max(0, len(items) + delta))
    # the buffer as 32-bit words, as a worker's shared memory view may be typed
    words = np.frombuffer(buffer + bytes(-len(buffer) % 4), dtype="<u4")
    _check_deserialize(words.data, max(0, len(items) + delta))


@pytest.mark.parametrize("count", [2**20, 2**31, 2**40, 2**62, 2**63 - 1, 2**64])
@pytest.mark.parametrize("size", [0, 3, 4, 64, 4096])
def test_deserialize_bytes_huge_count_fails_fast(count: int, size: int) -> None:
    """A huge count with a short buffer is refused before ``count`` slots are allocated."""
    out = bounded(lambda: dtypes.deserialize_bytes(bytes(size), count, name="t"), size, "deserialize_bytes")
    assert isinstance(out, InvalidInput)


# ---- bugs this fuzzer found (fixed; kept as regression tests) ------------------------------------


def test_deserialize_bytes_negative_count() -> None:
    # A negative count once reached np.empty(count) (ValueError). Not reachable from clients
    # (both decoders refuse negative dimensions), but the docstring promises InvalidInput.
    with pytest.raises(InvalidInput):
        dtypes.deserialize_bytes(b"", -1, name="t")
