"""Inputs from client system shared memory read into a backend's staging memory
(``ClientRegions.read_host`` with ``into``): large ones on threads, finished by
``finish_reads``; a region truncated under a read fails the batch; a descriptor is never
closed under a read in flight. Real POSIX shared-memory objects, cleaned up."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from shoal.proto.errors import InvalidInput
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.clientshm import THREADED_READ_BYTES, ClientRegions

SIZE = 2 * THREADED_READ_BYTES


@pytest.fixture
def objects() -> Iterator[list[str]]:
    """Three objects of ``SIZE`` bytes, each filled with its own byte value."""
    names = [f"shoaltest_reads_{os.getpid()}_{k}" for k in range(3)]
    for k, name in enumerate(names):
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes([k + 1]) * SIZE)
        finally:
            os.close(fd)
    yield names
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass


def _ref(region_id: int, key: str, nbytes: int, offset: int = 0) -> wpb.ClientShm:
    return wpb.ClientShm(region_id=region_id, key=key, device=-1, region_bytes=SIZE, offset=offset, nbytes=nbytes)


def _staging(size: int) -> tuple[np.ndarray, list[int]]:
    """A staging buffer handing out consecutive pieces, like a backend's ``host_input``."""
    return np.zeros(size, np.uint8), [0]


def test_large_and_small_reads_land_in_the_staging_memory(objects: list[str]) -> None:
    regions = ClientRegions()
    buf, used = _staging(4 * SIZE)

    def into(n: int) -> memoryview:
        start = used[0]
        used[0] += n
        return memoryview(buf)[start : start + n]

    try:
        views = [regions.read_host(_ref(k, name, SIZE), into) for k, name in enumerate(objects)]
        small = regions.read_host(_ref(0, objects[0], 100, offset=10), into)
        regions.finish_reads()
        for k, view in enumerate(views):
            assert bytes(view) == bytes([k + 1]) * SIZE
        assert bytes(small) == b"\x01" * 100
    finally:
        regions.close()


def test_a_truncated_object_fails_when_the_reads_finish(objects: list[str]) -> None:
    regions = ClientRegions()
    try:
        regions.read_host(_ref(0, objects[0], SIZE), lambda n: memoryview(np.zeros(n, np.uint8)))  # opened: full
        os.truncate(f"/dev/shm/{objects[0]}", SIZE // 2)
        regions.read_host(_ref(0, objects[0], SIZE), lambda n: memoryview(np.zeros(n, np.uint8)))
        regions.read_host(_ref(1, objects[1], SIZE), lambda n: memoryview(np.zeros(n, np.uint8)))
        with pytest.raises(InvalidInput, match="smaller than when it was registered"):
            regions.finish_reads()
        regions.finish_reads()  # nothing left pending
    finally:
        regions.close()


def test_no_descriptor_closes_under_a_read_in_flight(objects: list[str]) -> None:
    """With one descriptor kept open, every new region closes the last one: the reads
    started on it finish first."""
    regions = ClientRegions(max_open=1)
    try:
        for _ in range(5):
            got = [regions.read_host(_ref(k, name, SIZE), lambda n: memoryview(np.zeros(n, np.uint8)))
                   for k, name in enumerate(objects)]  # fmt: skip
            regions.finish_reads()
            assert [bytes(g[:1]) for g in got] == [b"\x01", b"\x02", b"\x03"]
            assert all(bytes(g) == bytes(g[:1]) * SIZE for g in got)
    finally:
        regions.close()


def test_output_writes_check_the_object_size_once_a_batch(objects: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_host`` checks a region's size at its first write of a batch (one ``fstat``,
    not one a request); a truncation is caught by the next batch's first write."""
    regions = ClientRegions()
    calls = [0]
    fstat = os.fstat

    def counted(fd: int) -> os.stat_result:
        calls[0] += 1
        return fstat(fd)

    try:
        regions.write_host(_ref(0, objects[0], 8), b"x" * 8, 8)  # opens the region
        monkeypatch.setattr(os, "fstat", counted)
        for batch in range(2):
            for k in range(10):
                regions.write_host(_ref(0, objects[0], 8, offset=8 * k), bytes([batch]) * 8, 8)
            regions.finish_writes()
            assert calls[0] == batch  # the first batch's check was made when the region opened
        os.truncate(f"/dev/shm/{objects[0]}", SIZE // 2)
        with pytest.raises(InvalidInput, match="smaller than when it was registered"):
            regions.write_host(_ref(0, objects[0], 8), b"y" * 8, 8)
        with open(f"/dev/shm/{objects[0]}", "rb") as f:
            assert f.read(80) == b"\x01" * 80
    finally:
        regions.close()
