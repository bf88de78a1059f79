"""``Arena``: a single-owner allocator of ``Block``s over POSIX shm segments.

Exactly one process (the owner) allocates and frees; other processes only map the blocks
(``shm.mapper.Mapper``) and hand them back to the owner with a message. No lock is shared
between processes. Not thread-safe: the owner uses it from one thread (the router's event
loop, or a worker's main thread).

The arena starts with one segment of ``segment_bytes`` and adds segments (each at least
as large as the request) when full, up to ``max_bytes`` in total; an allocation that does
not fit then fails with ``RESOURCE_EXHAUSTED``. Added segments that become empty are
kept for reuse (consumers may still have them mapped).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from shoal.proto.errors import ErrorCode, ServingError
from shoal.shm.block import HOST, Block
from shoal.shm.region import Segment

_ALIGN = 256


@dataclass(frozen=True, slots=True)
class ArenaStats:
    capacity_bytes: int
    in_use_bytes: int
    high_water_bytes: int
    live_blocks: int
    segments: int


class _FreeList:
    """First-fit allocator over ``[0, size)`` with coalescing on free."""

    __slots__ = ("size", "_starts", "_sizes", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts = [0]
        self._sizes = [size]
        self.used: dict[int, int] = {}

    def allocate(self, nbytes: int) -> int | None:
        starts, sizes = self._starts, self._sizes
        for i, avail in enumerate(sizes):
            if avail >= nbytes:
                off = starts[i]
                if avail == nbytes:
                    del starts[i]
                    del sizes[i]
                else:
                    starts[i] = off + nbytes
                    sizes[i] = avail - nbytes
                self.used[off] = nbytes
                return off
        return None

    def free(self, off: int) -> int:
        """Free the range at ``off``; returns its size."""
        size = nbytes = self.used.pop(off)
        starts, sizes = self._starts, self._sizes
        i = bisect.bisect_left(starts, off)
        # merge with the next free range
        if i < len(starts) and off + nbytes == starts[i]:
            nbytes += sizes[i]
            del starts[i]
            del sizes[i]
        # merge with the previous free range
        if i > 0 and starts[i - 1] + sizes[i - 1] == off:
            sizes[i - 1] += nbytes
        else:
            starts.insert(i, off)
            sizes.insert(i, nbytes)
        return size


class Arena:
    """Owner-side allocator; see the module docstring for ownership rules."""

    def __init__(
        self, prefix: str, *, segment_bytes: int, max_bytes: int, setting: str = "--shm-arena-max-bytes"
    ) -> None:
        """No segment exists until ``start`` or the first ``allocate``. ``prefix`` must be
        unique on the host; segments are named ``<prefix>_<n>``. ``setting``: the option that
        sizes this arena, named when it is full."""
        self.prefix = prefix
        self.setting = setting
        self.segment_bytes = segment_bytes
        self.max_bytes = max(max_bytes, segment_bytes)
        self._segments: dict[str, tuple[Segment, _FreeList]] = {}
        self._order: list[str] = []
        self._in_use = 0
        self._high_water = 0
        self._next = 0

    def start(self) -> None:
        """Create the first segment now rather than at the first allocation."""
        if not self._segments:
            self._add_segment(self.segment_bytes)

    def _add_segment(self, nbytes: int) -> tuple[Segment, _FreeList]:
        name = f"{self.prefix}_{self._next}"
        self._next += 1
        seg = Segment.create(name, nbytes)
        entry = (seg, _FreeList(nbytes))
        self._segments[name] = entry
        self._order.append(name)
        return entry

    def allocate(self, nbytes: int) -> Block:
        """A block of at least ``nbytes`` (rounded up to 256-byte alignment).

        Raises ``ServingError(RESOURCE_EXHAUSTED)`` when the arena cannot grow enough.
        """
        size = max(_ALIGN, (nbytes + _ALIGN - 1) & ~(_ALIGN - 1))
        for name in self._order:
            seg, fl = self._segments[name]
            off = fl.allocate(size)
            if off is not None:
                return self._account(name, off, nbytes, size)
        capacity = sum(s.nbytes for s, _ in self._segments.values())
        grow = max(self.segment_bytes, size)
        if capacity + grow > self.max_bytes:
            raise ServingError(
                f"the server's shared memory for tensors is full: {nbytes} bytes requested, {self._in_use} of "
                f"{self.max_bytes} in use (raise {self.setting})",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )
        seg, fl = self._add_segment(grow)
        off = fl.allocate(size)
        assert off is not None
        return self._account(seg.name, off, nbytes, size)

    def _account(self, name: str, off: int, nbytes: int, size: int) -> Block:
        self._in_use += size
        if self._in_use > self._high_water:
            self._high_water = self._in_use
        return Block(name, off, nbytes, HOST)

    def free(self, block: Block) -> None:
        """Return a block; raises ``KeyError`` for a block this arena does not hold."""
        _, fl = self._segments[block.region]
        self._in_use -= fl.free(block.offset)

    def owns(self, block: Block) -> bool:
        entry = self._segments.get(block.region)
        return entry is not None and block.offset in entry[1].used

    def view(self, block: Block) -> memoryview:
        """A writable view of the block's ``nbytes``; release it before ``close``."""
        seg = self._segments[block.region][0]
        return memoryview(seg.mm)[block.offset : block.offset + block.nbytes]

    def stats(self) -> ArenaStats:
        return ArenaStats(
            capacity_bytes=sum(s.nbytes for s, _ in self._segments.values()),
            in_use_bytes=self._in_use,
            high_water_bytes=self._high_water,
            live_blocks=sum(len(fl.used) for _, fl in self._segments.values()),
            segments=len(self._segments),
        )

    def close(self) -> None:
        """Unmap and unlink every segment; idempotent."""
        for seg, _ in self._segments.values():
            seg.close()
        self._segments.clear()
        self._order.clear()
