"""Arena allocator, Mapper and POSIX segments over the real /dev/shm (no processes)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import posix_ipc
import pytest

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.shm import region
from shoal.shm.arena import Arena
from shoal.shm.block import HOST, Block
from shoal.shm.mapper import Mapper
from shoal.shm.region import Segment

SHM = Path("/dev/shm")
KB4 = 4096


class ShmGuard:
    """The unique prefix of one test, and other segment names the test creates."""

    def __init__(self) -> None:
        self.prefix = f"shoal_{os.getpid()}_test{secrets.token_hex(4)}"
        self.extra: list[str] = []

    def track(self, name: str) -> str:
        self.extra.append(name)
        return name

    def left(self) -> list[str]:
        return sorted(n for n in os.listdir(SHM) if n.startswith(self.prefix) or n in self.extra)


@pytest.fixture(autouse=True)
def shm_guard() -> Iterator[ShmGuard]:
    guard = ShmGuard()
    yield guard
    leaked = guard.left()
    for name in leaked:
        region.unlink(name)
    assert not leaked, f"shared memory left in /dev/shm: {leaked}"


@pytest.fixture
def prefix(shm_guard: ShmGuard) -> str:
    return shm_guard.prefix


@pytest.fixture
def make_arena(prefix: str) -> Iterator[Callable[..., Arena]]:
    """Arenas that must have no live block at the end of the test; closed at teardown."""
    arenas: list[Arena] = []

    def make(segment_bytes: int = KB4, max_bytes: int = 1 << 20, name: str = "a") -> Arena:
        arena = Arena(f"{prefix}_{name}", segment_bytes=segment_bytes, max_bytes=max_bytes)
        arenas.append(arena)
        return arena

    yield make
    live = [a.stats().live_blocks for a in arenas]
    for a in arenas:
        a.close()
    assert live == [0] * len(arenas), f"blocks not freed: {live}"


def _create_raw(name: str, nbytes: int = 256) -> None:
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=nbytes)
    shm.close_fd()


def _exists(name: str) -> bool:
    return (SHM / name).exists()


# ---- allocation ----------------------------------------------------------------------------


def test_no_segment_until_start_or_allocate(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena()
    assert arena.stats().segments == 0
    assert not _exists(f"{prefix}_a_0")
    arena.start()
    arena.start()
    assert arena.stats().segments == 1
    assert (SHM / f"{prefix}_a_0").stat().st_size == KB4


def test_allocate_and_free(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena()
    b = arena.allocate(100)
    assert b == Block(f"{prefix}_a_0", 0, 100, HOST)
    assert arena.owns(b)
    s = arena.stats()
    assert (s.capacity_bytes, s.in_use_bytes, s.live_blocks, s.segments) == (KB4, 256, 1, 1)
    arena.free(b)
    assert not arena.owns(b)
    s = arena.stats()
    assert (s.live_blocks, s.high_water_bytes) == (0, 256)


@pytest.mark.parametrize(
    ("nbytes", "reserved"), [(0, 256), (1, 256), (255, 256), (256, 256), (257, 512), (1000, 1024), (1024, 1024)]
)
def test_alignment(make_arena: Callable[..., Arena], nbytes: int, reserved: int) -> None:
    arena = make_arena()
    first = arena.allocate(nbytes)
    second = arena.allocate(1)
    assert first.nbytes == nbytes
    assert first.offset == 0
    assert second.offset == reserved
    assert arena.stats().in_use_bytes == reserved + 256
    arena.free(first)
    arena.free(second)


def test_offsets_are_256_aligned(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=64 * 1024)
    blocks = [arena.allocate(n) for n in (1, 300, 7, 513, 256, 1023, 2)]
    assert all(b.offset % 256 == 0 for b in blocks)
    ends = sorted((b.offset, b.offset + b.nbytes) for b in blocks)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(ends, ends[1:], strict=False)), "blocks overlap"
    for b in blocks:
        arena.free(b)


def test_freed_block_is_reused(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena()
    a = arena.allocate(256)
    b = arena.allocate(256)
    arena.free(a)
    c = arena.allocate(200)
    assert c.offset == a.offset
    arena.free(b)
    arena.free(c)


def test_fragmentation_then_coalesce(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=KB4)
    blocks = [arena.allocate(256) for _ in range(16)]
    assert arena.stats().in_use_bytes == KB4
    for b in blocks[::2]:
        arena.free(b)
    # 2 KiB are free, but only in 256-byte holes
    with pytest.raises(ServingError) as ei:
        arena.allocate(512)
    assert ei.value.code is ErrorCode.RESOURCE_EXHAUSTED
    hole = arena.allocate(256)
    assert hole.offset == 0
    arena.free(hole)
    for b in blocks[1::2]:
        arena.free(b)
    big = arena.allocate(KB4)
    assert big.offset == 0
    assert arena.stats().segments == 1
    arena.free(big)


@pytest.mark.parametrize("order", ["forward", "reverse", "middle_out", "shuffled"])
def test_coalesce_in_any_free_order(make_arena: Callable[..., Arena], order: str) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=KB4)
    blocks = [arena.allocate(512) for _ in range(8)]
    idx = list(range(8))
    if order == "reverse":
        idx.reverse()
    elif order == "middle_out":
        idx = [3, 4, 2, 5, 1, 6, 0, 7]
    elif order == "shuffled":
        idx = [5, 0, 7, 2, 6, 1, 3, 4]
    for i in idx:
        arena.free(blocks[i])
    whole = arena.allocate(KB4)
    assert whole.offset == 0
    arena.free(whole)


def test_coalesce_with_both_neighbours(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=KB4)
    a, b, c, d = (arena.allocate(1024) for _ in range(4))
    arena.free(a)
    arena.free(c)
    arena.free(b)  # joins a and c into [0, 3072)
    abc = arena.allocate(3072)
    assert abc.offset == 0
    arena.free(abc)
    arena.free(d)


def test_double_free_and_foreign_block(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena()
    b = arena.allocate(10)
    arena.free(b)
    with pytest.raises(KeyError):
        arena.free(b)
    with pytest.raises(KeyError):
        arena.free(Block("shoal_nowhere", 0, 10))
    assert not arena.owns(Block("shoal_nowhere", 0, 10))
    assert arena.stats().live_blocks == 0


# ---- growth and limits ---------------------------------------------------------------------


def test_growth_by_extra_segments(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=3 * KB4)
    a = arena.allocate(KB4)
    b = arena.allocate(1)
    assert (a.region, b.region) == (f"{prefix}_a_0", f"{prefix}_a_1")
    assert arena.stats().segments == 2
    # fits the rest of segment 1: no growth
    c = arena.allocate(KB4 - 256)
    assert (c.region, c.offset) == (f"{prefix}_a_1", 256)
    # a 5 KiB segment would exceed 12 KiB in total
    with pytest.raises(ServingError) as ei:
        arena.allocate(5000)
    assert ei.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "shared memory for tensors is full" in ei.value.message
    d = arena.allocate(KB4)
    assert d.region == f"{prefix}_a_2"
    with pytest.raises(ServingError) as ei:
        arena.allocate(1)
    assert ei.value.code is ErrorCode.RESOURCE_EXHAUSTED
    s = arena.stats()
    assert (s.capacity_bytes, s.in_use_bytes, s.segments, s.live_blocks) == (3 * KB4, 3 * KB4, 3, 4)
    for blk in (a, b, c, d):
        arena.free(blk)
    s = arena.stats()
    # empty segments are kept for reuse
    assert (s.capacity_bytes, s.in_use_bytes, s.segments, s.live_blocks, s.high_water_bytes) == (
        3 * KB4,
        0,
        3,
        0,
        3 * KB4,
    )
    assert all(_exists(f"{prefix}_a_{i}") for i in range(3))


def test_request_larger_than_a_segment(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=1 << 20)
    small = arena.allocate(10)
    big = arena.allocate(10_000)
    assert (big.region, big.offset, big.nbytes) == (f"{prefix}_a_1", 0, 10_000)
    assert (SHM / big.region).stat().st_size == 10_240
    assert arena.stats().capacity_bytes == KB4 + 10_240
    arena.free(small)
    arena.free(big)


def test_first_allocation_larger_than_segment(make_arena: Callable[..., Arena], prefix: str) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=1 << 20)
    big = arena.allocate(3 * KB4)
    assert big.region == f"{prefix}_a_0"
    assert arena.stats().capacity_bytes == 3 * KB4
    arena.free(big)


def test_request_beyond_max_bytes(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=2 * KB4)
    with pytest.raises(ServingError) as ei:
        arena.allocate(2 * KB4 + 1)
    assert ei.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert arena.stats().segments == 0
    # exactly max_bytes is fine
    b = arena.allocate(2 * KB4)
    arena.free(b)


def test_max_bytes_at_least_one_segment(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=0)
    assert arena.max_bytes == KB4
    b = arena.allocate(KB4)
    arena.free(b)


def test_high_water(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena()
    a = arena.allocate(1000)
    b = arena.allocate(1000)
    arena.free(a)
    c = arena.allocate(10)
    s = arena.stats()
    assert (s.in_use_bytes, s.high_water_bytes, s.live_blocks) == (1280, 2048, 2)
    arena.free(b)
    arena.free(c)
    assert arena.stats().live_blocks == 0


# ---- views and the Mapper ------------------------------------------------------------------


def test_view_is_writable_and_sized(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena()
    a = arena.allocate(5)
    b = arena.allocate(3)
    with arena.view(a) as va, arena.view(b) as vb:
        assert (len(va), len(vb)) == (5, 3)
        va[:] = b"hello"
        vb[:] = b"abc"
    with arena.view(a) as va:
        assert bytes(va) == b"hello"
    arena.free(a)
    arena.free(b)


def test_mapper_sees_arena_bytes(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena(segment_bytes=KB4, max_bytes=4 * KB4)
    blocks = [arena.allocate(KB4), arena.allocate(300)]  # the second lands in segment 1
    for i, blk in enumerate(blocks):
        with arena.view(blk) as v:
            v[:] = bytes([i + 1]) * blk.nbytes
    mapper = Mapper()
    try:
        for i, blk in enumerate(blocks):
            # only the name crosses the process boundary
            by_name = Block(blk.region, blk.offset, blk.nbytes)
            with mapper.view(by_name) as mv:
                assert bytes(mv) == bytes([i + 1]) * blk.nbytes
                mv[:3] = b"xyz"
            with arena.view(blk) as v:
                assert bytes(v[:3]) == b"xyz"
    finally:
        mapper.close()
    for blk in blocks:
        arena.free(blk)


def test_mapper_caches_one_mapping_per_region(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena()
    a = arena.allocate(10)
    b = arena.allocate(10)
    mapper = Mapper()
    try:
        with mapper.view(a), mapper.view(b):
            assert list(mapper._segments) == [a.region]
    finally:
        mapper.close()
    arena.free(a)
    arena.free(b)


@pytest.mark.parametrize(("offset", "nbytes"), [(KB4, 1), (KB4 - 10, 11), (0, KB4 + 1), (-1, 10), (-256, 256)])
def test_mapper_refuses_block_outside_region(make_arena: Callable[..., Arena], offset: int, nbytes: int) -> None:
    arena = make_arena()
    arena.start()
    mapper = Mapper()
    try:
        with pytest.raises(InvalidInput, match="outside region of 4096 bytes") as ei:
            mapper.view(Block(f"{arena.prefix}_0", offset, nbytes))
        assert ei.value.code is ErrorCode.INVALID_ARGUMENT
        with mapper.view(Block(f"{arena.prefix}_0", KB4 - 1, 1)) as v:
            assert len(v) == 1
    finally:
        mapper.close()


def test_mapper_missing_region(prefix: str) -> None:
    mapper = Mapper()
    with pytest.raises(ServingError) as ei:
        mapper.view(Block(f"{prefix}_gone_0", 0, 1))
    assert ei.value.code is ErrorCode.NOT_FOUND
    mapper.close()


def test_mapper_never_unlinks(make_arena: Callable[..., Arena]) -> None:
    arena = make_arena()
    b = arena.allocate(8)
    mapper = Mapper()
    with mapper.view(b):
        pass
    mapper.close()
    mapper.close()
    assert _exists(b.region)
    arena.free(b)


def test_mapper_forget_prefix(make_arena: Callable[..., Arena]) -> None:
    one = make_arena(name="one")
    two = make_arena(name="two")
    a, b = one.allocate(8), two.allocate(8)
    mapper = Mapper()
    try:
        for blk in (a, b):
            with mapper.view(blk):
                pass
        mapper.forget_prefix(one.prefix + "_")
        assert list(mapper._segments) == [b.region]
        assert _exists(a.region)
        with mapper.view(a):  # mapped again on demand
            pass
    finally:
        mapper.close()
    one.free(a)
    two.free(b)


# ---- segments ------------------------------------------------------------------------------


def test_segment_create_twice(prefix: str) -> None:
    seg = Segment.create(f"{prefix}_dup", KB4)
    try:
        with pytest.raises(ServingError) as ei:
            Segment.create(f"{prefix}_dup", KB4)
        assert ei.value.code is ErrorCode.ALREADY_EXISTS
    finally:
        seg.close()
    assert not _exists(f"{prefix}_dup")


def test_segment_attach_and_close(prefix: str) -> None:
    owner = Segment.create(f"{prefix}_s", 512)
    other = Segment.attach(f"{prefix}_s")
    assert (other.nbytes, other.owner, owner.owner) == (512, False, True)
    other.mm[:4] = b"abcd"
    assert owner.mm[:4] == b"abcd"
    other.close()
    other.close()
    assert _exists(f"{prefix}_s")
    owner.close()
    owner.close()
    assert not _exists(f"{prefix}_s")


def test_segment_attach_missing(prefix: str) -> None:
    with pytest.raises(ServingError) as ei:
        Segment.attach(f"{prefix}_none")
    assert ei.value.code is ErrorCode.NOT_FOUND


def test_unlink_missing_is_ignored(prefix: str) -> None:
    region.unlink(f"{prefix}_never")


def test_unlink_prefix(shm_guard: ShmGuard) -> None:
    p = shm_guard.prefix
    for name in (f"{p}_a_0", f"{p}_a_1", f"{p}_b_0"):
        _create_raw(name)
    removed = region.unlink_prefix(f"{p}_a_")
    assert sorted(removed) == [f"{p}_a_0", f"{p}_a_1"]
    assert shm_guard.left() == [f"{p}_b_0"]
    assert region.unlink_prefix(f"{p}_a_") == []
    assert region.unlink_prefix(p) == [f"{p}_b_0"]


_HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.exclusive  # plants dead runs: another test's server start would reclaim them
def test_reclaim_stale_follows_owner_locks(shm_guard: ShmGuard) -> None:
    """A run whose owner lock is held survives, whatever its pid says (another PID
    namespace); a run whose lock is free (its router was killed, or is a zombie) or missing
    is removed, lock included; names that are not Shoal's are left alone."""
    tag = secrets.token_hex(4)
    runs = {kind: f"shoal_{999_000 + i}_{tag}" for i, kind in enumerate(("live", "dead", "nolock", "zombie"))}
    for kind, run in runs.items():
        _create_raw(shm_guard.track(f"{run}_in_0"))
        if kind != "nolock":
            shm_guard.track(region.lock_name(run))
    lock = str(SHM / region.lock_name(runs["dead"]))
    Path(lock).write_bytes(b"")  # a lock file nobody holds
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(SHM / region.lock_name(runs["live"]))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    zombie = subprocess.Popen([sys.executable, "-c", _HOLD, str(SHM / region.lock_name(runs["zombie"]))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    not_ours = shm_guard.track(f"shoalx_1_{tag}_0")
    _create_raw(not_ours)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert zombie.stdout is not None and zombie.stdout.readline() == "locked\n"
        assert zombie.stdin is not None
        zombie.stdin.close()  # it exits; not waited for yet, so it stays a zombie
        while Path(f"/proc/{zombie.pid}/status").read_text().find("State:\tZ") < 0:
            time.sleep(0.01)
        removed = region.reclaim_stale()
        for kind in ("dead", "nolock", "zombie"):
            assert f"{runs[kind]}_in_0" in removed and not _exists(f"{runs[kind]}_in_0"), kind
        assert not _exists(region.lock_name(runs["dead"])) and not _exists(region.lock_name(runs["zombie"]))
        assert _exists(f"{runs['live']}_in_0") and _exists(region.lock_name(runs["live"]))
        assert _exists(not_ours) and not_ours not in removed
    finally:
        for proc in (holder, zombie):
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
        for name in list(shm_guard.extra):
            region.unlink(name)


# ---- close ---------------------------------------------------------------------------------


def test_close_unlinks_everything(prefix: str) -> None:
    arena = Arena(f"{prefix}_c", segment_bytes=KB4, max_bytes=8 * KB4)
    blocks = [arena.allocate(KB4) for _ in range(3)]
    names = [b.region for b in blocks]
    assert len(set(names)) == 3
    assert all(_exists(n) for n in names)
    arena.close()
    assert not any(_exists(n) for n in names)
    s = arena.stats()
    assert (s.segments, s.capacity_bytes, s.live_blocks) == (0, 0, 0)
    arena.close()


def test_close_with_a_view_still_exported(prefix: str) -> None:
    arena = Arena(f"{prefix}_v", segment_bytes=KB4, max_bytes=KB4)
    b = arena.allocate(4)
    v = arena.view(b)
    v[:] = b"live"
    arena.close()
    assert not _exists(b.region)
    assert bytes(v) == b"live"  # the mapping outlives the name until the view is released
    v.release()
