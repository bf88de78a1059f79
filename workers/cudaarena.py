"""``CudaArena``: a GPU worker's device memory for outputs that stay on the GPU.

An ensemble step's output that only GPU steps read, or a BLS caller on a GPU asked for
(the router or the caller decides, per requested output: ``Request.device_outputs``), is
copied on the device into this arena instead of down to the host, when the backend returned
it in GPU memory. The reply describes it as a ``ShmSlice`` with the server's GPU ordinal
and the segment's CUDA IPC handle; the router never maps it, and hands it to the next step
as a CUDA region (``ClientShm`` with the handle), which that worker opens and reads in
place, as it does a client's CUDA shared memory. The router's ``Release`` gives the block
back, as for the host arena.

Segments are plain ``cudaMalloc`` allocations (IPC handles need the allocation's base, so
not PyTorch's or CuPy's caching pools), ``segment_bytes`` each, added when full up to
``max_bytes``; an output that does not fit goes to the host arena instead. Used from the
worker's main thread (under the output writer's lock). CuPy is imported on first use.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shoal.shm.arena import _ALIGN, _FreeList
from shoal.shm.block import Block
from shoal.workers.devview import as_cupy

log = logging.getLogger(__name__)


class CudaArena:
    def __init__(self, prefix: str, device: int, server_device: int, *, segment_bytes: int, max_bytes: int) -> None:
        """``device``: this process's CUDA ordinal; ``server_device``: the server's ordinal of
        that GPU (what blocks carry). Segments are named ``<prefix>_cuda<n>``."""
        self.prefix = prefix
        self.device = device
        self.server_device = server_device
        self.segment_bytes = segment_bytes
        self.max_bytes = max(max_bytes, segment_bytes)
        self._segments: dict[str, tuple[Any, bytes, _FreeList]] = {}
        """name -> (cupy Memory, IPC handle, free list)"""
        self._order: list[str] = []
        self.in_use = 0

    def allocate(self, nbytes: int) -> tuple[Block, bytes, int] | None:
        """A block of ``nbytes``, its segment's IPC handle and size; ``None`` when the arena
        is full (the caller uses host memory)."""
        size = max(_ALIGN, (nbytes + _ALIGN - 1) & ~(_ALIGN - 1))
        for name in self._order:
            mem, handle, fl = self._segments[name]
            off = fl.allocate(size)
            if off is not None:
                self.in_use += size
                return Block(name, off, nbytes, self.server_device), handle, fl.size
        grow = max(self.segment_bytes, size)
        if sum(fl.size for _, _, fl in self._segments.values()) + grow > self.max_bytes:
            return None
        name = self._add_segment(grow)
        mem, handle, fl = self._segments[name]
        off = fl.allocate(size)
        assert off is not None
        self.in_use += size
        return Block(name, off, nbytes, self.server_device), handle, fl.size

    def _add_segment(self, nbytes: int) -> str:
        import cupy

        name = f"{self.prefix}_cuda{len(self._order)}"
        with cupy.cuda.Device(self.device):
            mem = cupy.cuda.Memory(nbytes)  # cudaMalloc: its own allocation, so it has a handle
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr))
        self._segments[name] = (mem, handle, _FreeList(nbytes))
        self._order.append(name)
        log.debug("CUDA arena segment %s: %d bytes on device %d", name, nbytes, self.device)
        return name

    def copy_in(self, block: Block, array: Any) -> None:
        """Copy the CuPy ``array`` (``block.nbytes`` bytes) into ``block`` on the device; returns
        once the copy is done, so the reply that names it can go out. The copy runs on the
        legacy default stream, after the work queued there: a Python model's GPU tensor may
        still be being computed there (PyTorch's and CuPy's default), while the PyTorch
        backend's outputs, made on its instance's own stream, were waited for already (and the
        next batch queued on that stream is not waited for)."""
        import cupy

        mem = self._segments[block.region][0]
        with cupy.cuda.Device(self.device), cupy.cuda.Stream.null:
            src = cupy.ascontiguousarray(as_cupy(array))
            kind = cupy.cuda.runtime.memcpyDefault  # the array may lie on another GPU
            cupy.cuda.runtime.memcpyAsync(mem.ptr + block.offset, src.data.ptr, block.nbytes, kind, 0)
            cupy.cuda.runtime.streamSynchronize(0)

    def free(self, block: Block) -> None:
        """Give a block back; raises ``KeyError`` for one this arena does not hold."""
        self.in_use -= self._segments[block.region][2].free(block.offset)

    def owns(self, block: Block) -> bool:
        entry = self._segments.get(block.region)
        return entry is not None and block.offset in entry[2].used

    def close(self) -> None:
        self._segments.clear()
        self._order.clear()


class DeviceMapper:
    """The caller's side of another worker's CUDA arena for BLS outputs: opens each segment's
    IPC handle once (by segment name) and copies a block into memory of this process (the
    block goes back to its owner right after the reply is read). ``local_device`` maps the
    server's GPU ordinal to this process's."""

    def __init__(self, local_device: Any) -> None:
        self._local_device = local_device
        self._lock = threading.Lock()  # BLS calls come from the model's threads too
        self._open: dict[str, tuple[int, int]] = {}
        """segment name -> (pointer, this process's device)"""

    def copy(self, s: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A CuPy array (on this process's GPU 0) with a copy of the block ``s`` (a
        ``ShmSlice`` with ``cuda_handle``)."""
        import cupy

        from shoal.proto.errors import InvalidInput

        if not s.cuda_handle or s.offset + s.nbytes > s.segment_bytes:
            raise InvalidInput(f"a GPU output block of '{s.region}' without a valid handle")
        with self._lock:
            opened = self._open.get(s.region)
            if opened is None:
                device = int(self._local_device(s.device))
                with cupy.cuda.Device(device):
                    flag = cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
                    ptr = cupy.cuda.runtime.ipcOpenMemHandle(s.cuda_handle, flag)
                opened = self._open[s.region] = (int(ptr), device)
        ptr, _ = opened
        with cupy.cuda.Device(0):
            out = cupy.empty(shape, dtype=dtype)
            if s.nbytes:
                if out.nbytes != s.nbytes:
                    raise InvalidInput(f"a GPU output of {s.nbytes} bytes for shape {list(shape)}")
                kind = cupy.cuda.runtime.memcpyDefault
                cupy.cuda.runtime.memcpy(out.data.ptr, ptr + s.offset, s.nbytes, kind)
        return out

    def forget_prefix(self, prefix: str) -> None:
        """Close the handles of segments whose names start with ``prefix`` (their worker exited)."""
        with self._lock:
            for name in [n for n in self._open if n.startswith(prefix)]:
                self._close(name)

    def _close(self, name: str) -> None:
        import cupy

        ptr, device = self._open.pop(name)
        try:
            with cupy.cuda.Device(device):
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        except Exception:  # noqa: BLE001 - closing must not kill the worker
            log.exception("closing the CUDA IPC handle of %s failed", name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._open):
                self._close(name)
