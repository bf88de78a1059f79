"""``Mapper``: the consumer side of arenas; maps regions by name and never frees."""

from __future__ import annotations

from shoal.shm.block import Block
from shoal.shm.region import Segment


class Mapper:
    """Caches one mapping per region name. Used from one thread."""

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}

    def view(self, block: Block) -> memoryview:
        """A writable view of ``block``; raises ``ServingError(NOT_FOUND)`` if its region is
        gone, and ``INVALID_ARGUMENT`` if the block lies outside it."""
        seg = self._segments.get(block.region)
        if seg is None:
            seg = Segment.attach(block.region)
            self._segments[block.region] = seg
        end = block.offset + block.nbytes
        if block.offset < 0 or end > seg.nbytes:
            from shoal.proto.errors import InvalidInput

            raise InvalidInput(f"block [{block.offset}, {end}) outside region of {seg.nbytes} bytes")
        return memoryview(seg.mm)[block.offset : end]

    def forget_prefix(self, prefix: str) -> None:
        """Unmap every cached region whose name starts with ``prefix``."""
        for name in [n for n in self._segments if n.startswith(prefix)]:
            self._segments.pop(name).close()

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
