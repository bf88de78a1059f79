"""Many device-to-device copies of one batch in one kernel launch.

DESIGN (issue 18, CUDA shared memory): a batch over CUDA shared memory copies each request's
input into the batch's device buffer and each request's output rows into its client's
region. One ``cudaMemcpyAsync`` costs the worker's main thread 5-6 us on the H200 host
(``cudaMemcpyBatchAsync`` of 64 copies cost no less than 64 of them; ``scripts/cuda_call_costs``),
and with the stream ordering around them the copies were about 15% of a request's work at
c=256. ``SegmentCopier.copy`` launches one kernel for a batch's copies instead (48 us for 64):
each block row of the grid copies one segment, 16 bytes a thread at a time when the
segment's addresses and size allow it, bytes otherwise. The (destination, source, bytes)
table is written to pinned host memory, which the kernel reads where it lies (with unified
addressing pinned memory is mapped on every device); a table is reused only once the launch
that read it is done (an event per table, ``TABLES`` in turn). Fewer than ``MIN_SEGMENTS``
copies, and copies between devices, use ``cudaMemcpyAsync``. The callers choose the stream:
the instance's own for inputs, a highest-priority one for outputs
(``ClientRegions._copy_stream`` says why). CuPy is imported by the first copy only.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

MIN_SEGMENTS: Final = 3
"""From this many segments one kernel launch is cheaper than a copy each."""
THREADS: Final = 256
MAX_BLOCKS_PER_SEGMENT: Final = 64
MAX_GRID_Y: Final = 65535
TABLES: Final = 4
"""Pinned tables used in turn."""

_SOURCE: Final = r"""
extern "C" __global__ void shoal_copy_segments(const unsigned long long* table, int count) {
    int seg = blockIdx.y;
    if (seg >= count) return;
    unsigned long long dst = table[3 * seg], src = table[3 * seg + 1], n = table[3 * seg + 2];
    unsigned long long start = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    if (((dst | src | n) & 15ULL) == 0) {
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)dst;
        for (unsigned long long i = start; i < n / 16; i += step) d[i] = s[i];
    } else {
        const unsigned char* s = (const unsigned char*)src;
        unsigned char* d = (unsigned char*)dst;
        for (unsigned long long i = start; i < n; i += step) d[i] = s[i];
    }
}
"""


class _Table:
    __slots__ = ("memory", "rows", "array", "done")

    def __init__(self, cupy: Any, rows: int) -> None:
        self.memory = cupy.cuda.alloc_pinned_memory(rows * 24)
        self.rows = rows
        self.array = np.frombuffer(self.memory, dtype=np.uint64, count=rows * 3).reshape(rows, 3)
        self.done: Any = None
        """The event after the last launch that read this table."""


class SegmentCopier:
    """Copies lists of (destination, source, bytes) device addresses on a stream."""

    def __init__(self) -> None:
        self._cupy: Any = None
        self._kernel: Any = None
        self._tables: list[_Table | None] = [None] * TABLES
        self._next = 0
        self.launches = 0
        """Kernel launches so far (tests: one per batch)."""

    def _table(self, rows: int) -> _Table:
        """The next table in turn, grown to ``rows`` (its last launch waited for first: it is
        ``TABLES`` launches old, so done but for a device far behind)."""
        i = self._next
        self._next = (i + 1) % TABLES
        table = self._tables[i]
        if table is not None and table.done is not None:
            table.done.synchronize()
        if table is None or table.rows < rows:
            table = self._tables[i] = _Table(self._cupy, max(rows, 64))
        return table

    def copy(self, segments: list[tuple[int, int, int]], stream: Any) -> None:
        """Copy each (destination, source, bytes) on ``stream`` (a CuPy stream of the current
        device, where both addresses must lie). Asynchronous: the caller orders or waits
        for ``stream``."""
        segments = [s for s in segments if s[2] > 0]
        if not segments:
            return
        if self._cupy is None:
            import cupy

            self._cupy = cupy
        cupy = self._cupy
        if len(segments) < MIN_SEGMENTS:
            rt = cupy.cuda.runtime
            for dst, src, n in segments:
                rt.memcpyAsync(dst, src, n, rt.memcpyDefault, stream.ptr)
            return
        if self._kernel is None:
            self._kernel = cupy.RawKernel(_SOURCE, "shoal_copy_segments")
        for first in range(0, len(segments), MAX_GRID_Y):
            part = segments[first : first + MAX_GRID_Y]
            table = self._table(len(part))
            table.array[: len(part)] = part
            largest = max(n for _, _, n in part)
            blocks = max(1, min(MAX_BLOCKS_PER_SEGMENT, -(-largest // (THREADS * 16))))
            ptr = np.uint64(table.memory.ptr)  # pinned: the device reads it where it lies
            self._kernel((blocks, len(part)), (THREADS,), (ptr, np.int32(len(part))), stream=stream)
            done = cupy.cuda.Event(block=False, disable_timing=True)
            done.record(stream)
            table.done = done
            self.launches += 1
