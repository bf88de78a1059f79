"""Host inputs of a GPU onnxruntime session staged in pinned memory and copied up once a batch.

DESIGN (issue 18): bound as host memory, a batch's inputs from client system shared memory
took three passes over their bytes on the worker's main thread: the worker's read out of the
client's region, the join of the requests' arrays (``merged_inputs``), and onnxruntime's copy
of pageable memory to the device. A profile of resnet18 (ONNX, batches of ~127, c=256 over
system shm on the H200) put 38 of the main thread's 48% there and 2.4% in the run itself.

``PinnedStaging`` is the backend's ``host_input``: the worker reads each input straight into
one page-locked buffer (the large reads on its threads). When a batch's arrays of an input lie
there one after the other, as they do for a model with one input, ``batch_inputs`` copies them
to the device in one asynchronous copy (zero rows after them for ``batchpad``'s padding), and
the session binds that device buffer as it binds CUDA shared memory. Several inputs, which
interleave request by request, go up in one copy of the staged bytes and are sorted into
their inputs' buffers on the device by one kernel launch (``workers.cudacopy``). Inputs that
did not come from client shared memory (the request's body: a frame or the router's arena) are
joined into the same buffer (``_join``: on ``JOIN_THREADS`` threads from ``PARALLEL_BYTES``
on) and go up in one copy too. They were joined on the host into fresh memory and copied up
from there, pageable: resnet18 (ONNX) over plain gRPC at c=64 ran batches of 32 in 21.9 ms,
over system shm in 6.5 ms (H200, 2026-12-04, one run). The buffer grows to the largest batch
seen; a batch is done with it before the worker reads the next (``begin``), the session's run
being synchronous.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from shoal.workers.cudacopy import SegmentCopier

ALIGN: Final = 16
"""Byte alignment of each input handed out."""
JOIN_THREADS: Final = 4
PARALLEL_BYTES: Final = 4 << 20
"""Bytes of one input's batch from which ``_join`` copies on ``JOIN_THREADS`` threads (numpy
lets go of the GIL for large copies)."""


class PinnedStaging:
    """One page-locked buffer for a batch's host inputs (CuPy's pinned allocator)."""

    def __init__(self) -> None:
        self._mem: Any = None
        self._view: np.ndarray | None = None
        self._base = self._capacity = self._used = 0
        self._retired: list[Any] = []
        """Buffers outgrown during the batch (its earlier inputs still live there)."""
        self._stream: Any = None
        self._copier: SegmentCopier | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def begin(self) -> None:
        """A new batch: what was handed out before is no longer used. Buffers outgrown
        during the last batch go back to the system, not to CuPy's pinned pool (which would
        keep them, page-locked, for good: about 127 MiB per instance after the first batch
        of 128 resnet18 images, grown from 1 MiB by doubling)."""
        self._used = 0
        if self._retired:
            import cupy

            self._retired.clear()
            cupy.get_default_pinned_memory_pool().free_all_blocks()

    def take(self, nbytes: int) -> memoryview:
        """``nbytes`` of pinned memory for one input of the current batch."""
        start = -(-self._used // ALIGN) * ALIGN
        end = start + nbytes
        if self._view is None or end > self._capacity:
            import cupy

            if self._mem is not None:
                self._retired.append(self._mem)
            capacity = max(end, 2 * self._capacity, 1 << 20)
            self._mem = cupy.cuda.alloc_pinned_memory(capacity)
            self._view = np.frombuffer(self._mem, np.uint8, capacity)
            self._base, self._capacity = self._view.ctypes.data, capacity
            start, end = 0, nbytes
        self._used = end
        return self._view[start:end].data

    def _plan(self, arrays: list[Any]) -> _Plan | None:
        """Where the requests' ``arrays`` of one input lie in this buffer, or None when one
        does not lie there (or they differ in type or in their other dimensions)."""
        first = arrays[0]
        if self._view is None or type(first) is not np.ndarray:
            return None
        tail, dtype = first.shape[1:], first.dtype
        lo, hi = self._base, self._base + self._used
        rows, adjacent, at = 0, True, first.ctypes.data
        for a in arrays:
            if type(a) is not np.ndarray or a.shape[1:] != tail or a.dtype != dtype or not a.flags.c_contiguous:
                return None
            ptr = a.ctypes.data
            if ptr < lo or ptr + a.nbytes > hi:
                return None
            adjacent = adjacent and ptr == at
            at = ptr + a.nbytes
            rows += a.shape[0]
        return _Plan(arrays, rows, tail, dtype, adjacent)

    def batch_inputs(self, parts: Mapping[str, list[Any]], pad: int) -> dict[str, Any] | None:
        """Each input's arrays of a batch (``parts``: name -> the requests' arrays) joined on
        the device (CuPy arrays, ``pad`` rows of zeros after them), or None when one of them
        does not lie in this buffer (the caller joins them on the host). One input's arrays
        one after the other (a model with one input) go up in one copy; inputs of several,
        which interleave request by request, go up in one copy of the staged bytes and are
        then gathered on the device into each input's buffer by one kernel launch
        (``workers.cudacopy``). Waits for the copies."""
        plans = {}
        mem = self._mem
        for name, arrays in parts.items():
            plan = self._plan(arrays)
            if plan is None:
                whole = self._join(arrays)
                if whole is None:
                    return None
                plan = _Plan([whole], whole.shape[0], whole.shape[1:], whole.dtype, True)
            plans[name] = plan
        if self._mem is not mem and not all(p.adjacent for p in plans.values()):
            return None  # interleaved inputs go up as one piece of the buffer, which _join replaced
        import cupy

        rt = cupy.cuda.runtime
        if self._stream is None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
        stream = self._stream
        with stream:
            outs = {name: cupy.empty((p.rows + pad, *p.tail), dtype=p.dtype) for name, p in plans.items()}
            if all(p.adjacent for p in plans.values()):
                for name, p in plans.items():
                    nbytes = sum(a.nbytes for a in p.arrays)
                    if nbytes:
                        first = p.arrays[0].ctypes.data
                        rt.memcpyAsync(outs[name].data.ptr, first, nbytes, rt.memcpyHostToDevice, stream.ptr)
            else:
                whole = cupy.empty(self._used, dtype=np.uint8)
                rt.memcpyAsync(whole.data.ptr, self._base, self._used, rt.memcpyHostToDevice, stream.ptr)
                segments = []
                for name, p in plans.items():
                    pos = outs[name].data.ptr
                    for a in p.arrays:
                        segments.append((pos, whole.data.ptr + a.ctypes.data - self._base, a.nbytes))
                        pos += a.nbytes
                if self._copier is None:
                    self._copier = SegmentCopier()
                self._copier.copy(segments, stream)
            if pad:
                for name, p in plans.items():
                    outs[name][p.rows :] = 0
        stream.synchronize()
        return outs

    def _join(self, arrays: list[Any]) -> np.ndarray | None:
        """The requests' host ``arrays`` of one input joined into this buffer, or None when
        they cannot be (not numpy arrays of one fixed-size type and row shape)."""
        first = arrays[0]
        if type(first) is not np.ndarray or first.ndim == 0 or first.dtype.hasobject:
            return None
        tail, dtype = first.shape[1:], first.dtype
        rows = 0
        for a in arrays:
            if type(a) is not np.ndarray or a.shape[1:] != tail or a.dtype != dtype:
                return None
            rows += a.shape[0]
        count = rows * int(np.prod(tail, dtype=np.int64))
        if count == 0:
            return None
        out = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype, count=count).reshape((rows, *tail))
        if count * dtype.itemsize < PARALLEL_BYTES or len(arrays) < 2:
            np.concatenate(arrays, out=out)
            return out
        places, at = [], 0
        for a in arrays:
            places.append((at, a))
            at += a.shape[0]
        groups = [places[k::JOIN_THREADS] for k in range(JOIN_THREADS)]

        def copy(group: list[tuple[int, np.ndarray]]) -> None:
            for row, a in group:
                out[row : row + a.shape[0]] = a

        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(JOIN_THREADS, thread_name_prefix="shoal-join")
        for done in [self._pool.submit(copy, g) for g in groups if g]:
            done.result()
        return out


class _Plan:
    """One input's arrays of a batch in the staging buffer (``PinnedStaging._plan``)."""

    __slots__ = ("arrays", "rows", "tail", "dtype", "adjacent")

    def __init__(self, arrays: list[Any], rows: int, tail: tuple[int, ...], dtype: Any, adjacent: bool) -> None:
        self.arrays = arrays
        self.rows = rows
        self.tail = tail
        self.dtype = dtype
        self.adjacent = adjacent
        """Each array starts where the one before ends (one copy up)."""
