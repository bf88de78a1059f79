"""Host inputs of a GPU onnxruntime session staged in pinned memory and copied up once a batch.

DESIGN (issue 18): bound as host memory, a batch's inputs from client system shared memory
took three passes over their bytes on the worker's main thread: the worker's read out of the
client's region, the join of the requests' arrays (``merged_inputs``), and onnxruntime's copy
of pageable memory to the device. A profile of resnet18 (ONNX, batches of ~127, c=256 over
system shm on the H200) put 38 of the main thread's 48% there and 2.4% in the run itself.

``PinnedStaging`` is the backend's ``host_input``: the worker reads each input straight into
one page-locked buffer (the large reads on its threads). When a batch's arrays of an input lie
there one after the other, as they do for a model with one input, ``batch`` copies them to the
device in one asynchronous copy (zero rows after them for ``batchpad``'s padding), and the
session binds that device buffer as it binds CUDA shared memory. Anything else (several
inputs, which interleave request by request; inputs that did not come from client shared
memory) is joined on the host as before. The buffer grows to the largest batch seen; a batch
is done with it before the worker reads the next (``begin``), the session's run being
synchronous.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

ALIGN: Final = 16
"""Byte alignment of each input handed out."""


class PinnedStaging:
    """One page-locked buffer for a batch's host inputs (CuPy's pinned allocator)."""

    def __init__(self) -> None:
        self._mem: Any = None
        self._view: np.ndarray | None = None
        self._base = self._capacity = self._used = 0
        self._retired: list[Any] = []
        """Buffers outgrown during the batch (its earlier inputs still live there)."""
        self._stream: Any = None

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

    def batch(self, arrays: list[Any], pad: int) -> Any:
        """The requests' ``arrays`` of one input joined on the device (a CuPy array, ``pad``
        rows of zeros after them), or None when they do not lie one after the other in this
        buffer (the caller joins them on the host)."""
        first = arrays[0]
        if self._view is None or type(first) is not np.ndarray:
            return None
        ptr = first.ctypes.data
        if ptr < self._base:
            return None
        rows, tail = 0, first.shape[1:]
        for a in arrays:
            if type(a) is not np.ndarray or a.ctypes.data != ptr or a.shape[1:] != tail or a.dtype != first.dtype:
                return None
            if not a.flags.c_contiguous:
                return None
            ptr += a.nbytes
            rows += a.shape[0]
        if ptr > self._base + self._used:
            return None
        import cupy

        if self._stream is None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
        out = cupy.empty((rows + pad, *tail), dtype=first.dtype)
        nbytes = ptr - first.ctypes.data
        with self._stream:
            if nbytes:
                cupy.cuda.runtime.memcpyAsync(
                    out.data.ptr, first.ctypes.data, nbytes, cupy.cuda.runtime.memcpyHostToDevice, self._stream.ptr
                )
            if pad:
                out[rows:] = 0
        self._stream.synchronize()
        return out
