"""``ClientRegions``: a worker's mappings of client shared-memory regions.

System regions are POSIX shm objects the client created; the worker opens them by key,
maps them once per registration (``region_id``) and reads inputs / writes outputs in
place. Before each use the object's current size is checked again (a client may have
truncated it since registration; touching pages past the end would be a SIGBUS).

CUDA regions are CUDA IPC handles; the worker opens each once with CuPy (imported only
when a CUDA region is used) and caches the device pointer. A CPU backend gets a host copy
of a CUDA input (one device-to-host copy, here in the worker); outputs are copied into
the region and the copy is synchronized before the worker replies.

The router sends ``Forget`` once a region is unregistered and no request uses it; the
mapping is then closed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from typing import Any

import numpy as np
import posix_ipc

from proto.errors import ErrorCode, InvalidInput, ServingError
from proto.gen import worker_pb2 as wpb

log = logging.getLogger("shoal.worker.shm")


class _SystemRegion:
    __slots__ = ("fd", "mm", "end")

    def __init__(self, fd: int, mm: mmap.mmap, end: int) -> None:
        self.fd = fd
        self.mm = mm
        self.end = end

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # a view is still alive (a backend kept an input); it unmaps when that is freed
            log.debug("a client region is still referenced; unmapped when the last view goes")
        os.close(self.fd)


class _CudaRegion:
    __slots__ = ("ptr", "device", "nbytes")

    def __init__(self, ptr: int, device: int, nbytes: int) -> None:
        self.ptr = ptr
        self.device = device
        self.nbytes = nbytes

    def close(self) -> None:
        import cupy

        with cupy.cuda.Device(self.device):
            cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)


class ClientRegions:
    def __init__(self) -> None:
        self._system: dict[int, _SystemRegion] = {}
        self._cuda: dict[int, _CudaRegion] = {}
        self.gpu_order: list[int] = []
        """Server GPU ordinals in this worker's CUDA order (empty: the same order)."""

    def local_device(self, device: int) -> int:
        """This process's CUDA ordinal of server GPU ``device``."""
        if not self.gpu_order:
            return device
        try:
            return self.gpu_order.index(device)
        except ValueError:
            raise InvalidInput(f"CUDA shared memory on GPU {device}: this instance cannot see that GPU") from None

    # ---- system memory ------------------------------------------------------------------------

    def _system_region(self, c: wpb.ClientShm) -> _SystemRegion:
        region = self._system.get(c.region_id)
        if region is None:
            end = c.region_offset + c.region_bytes
            try:
                obj = posix_ipc.SharedMemory("/" + c.key)
            except (posix_ipc.ExistentialError, posix_ipc.PermissionsError) as exc:
                log.warning("cannot open client shm key %r: %s", c.key, exc)
                raise ServingError(
                    "unable to open the shared memory region: its key no longer exists", code=ErrorCode.NOT_FOUND
                ) from None
            fd = obj.fd
            try:
                if os.fstat(fd).st_size < end:
                    raise InvalidInput("the shared memory region is now smaller than when it was registered")
                mm = mmap.mmap(fd, end)
            except BaseException:
                os.close(fd)
                raise
            region = _SystemRegion(fd, mm, end)
            self._system[c.region_id] = region
        elif os.fstat(region.fd).st_size < region.end:
            raise InvalidInput("the shared memory region is now smaller than when it was registered")
        return region

    def host_view(self, c: wpb.ClientShm, nbytes: int | None = None) -> memoryview:
        """A writable view of ``nbytes`` (default: the tensor's) at the tensor's offset."""
        n = c.nbytes if nbytes is None else nbytes
        if c.offset + n > c.region_bytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        start = c.region_offset + c.offset
        return memoryview(self._system_region(c).mm)[start : start + n]

    # ---- CUDA memory --------------------------------------------------------------------------

    def _cuda_region(self, c: wpb.ClientShm) -> _CudaRegion:
        region = self._cuda.get(c.region_id)
        if region is None:
            region = _open_ipc(c, self.local_device(c.device))
            self._cuda[c.region_id] = region
        return region

    def open(self, c: wpb.ClientShm) -> None:
        """Map the region now (registration-time check); raises as a use would."""
        if c.device >= 0:
            self._cuda_region(c)
        else:
            self._system_region(c)

    def device_array(self, c: wpb.ClientShm, dtype: Any, count: int) -> Any:
        """A CuPy array over the tensor's bytes in the CUDA region (no copy)."""
        import cupy

        region = self._cuda_region(c)
        if c.offset + c.nbytes > region.nbytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        mem = cupy.cuda.UnownedMemory(region.ptr + c.offset, c.nbytes, self, device_id=region.device)
        with cupy.cuda.Device(region.device):
            return cupy.ndarray((count,), dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))

    def read_cuda_to_host(self, c: wpb.ClientShm) -> memoryview:
        """The tensor's bytes copied to host memory."""
        import cupy

        region = self._cuda_region(c)
        if c.offset + c.nbytes > region.nbytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        out = np.empty(c.nbytes, dtype=np.uint8)
        with cupy.cuda.Device(region.device):
            cupy.cuda.runtime.memcpy(out.ctypes.data, region.ptr + c.offset, c.nbytes, cupy.cuda.runtime.memcpyDefault)
        return out.data

    def write_cuda(self, c: wpb.ClientShm, data: Any, nbytes: int) -> None:
        """Copy ``data`` (host bytes / numpy array, or a CUDA array) into the region and wait
        for the copy to finish."""
        import cupy

        region = self._cuda_region(c)
        if c.offset + nbytes > region.nbytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        if nbytes == 0:
            return
        with cupy.cuda.Device(region.device):
            if isinstance(data, cupy.ndarray):
                src_ptr = data.data.ptr
                keep: Any = data
            else:
                keep = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)
                src_ptr = keep.ctypes.data
            cupy.cuda.runtime.memcpy(region.ptr + c.offset, src_ptr, nbytes, cupy.cuda.runtime.memcpyDefault)
            cupy.cuda.runtime.deviceSynchronize()
            del keep

    # ---- lifetime -----------------------------------------------------------------------------

    def forget(self, region_ids: Any) -> None:
        for rid in region_ids:
            for table in (self._system, self._cuda):
                region = table.pop(rid, None)
                if region is not None:
                    try:
                        region.close()
                    except Exception:  # noqa: BLE001 - unmapping must not kill the worker
                        log.exception("closing client region %d failed", rid)

    def close(self) -> None:
        self.forget(list(self._system) + list(self._cuda))


def _open_ipc(c: wpb.ClientShm, device: int) -> _CudaRegion:
    try:
        import cupy
    except ImportError:
        raise ServingError(
            "CUDA shared memory needs CuPy in the worker's environment (pip install cupy-cuda12x)",
            code=ErrorCode.UNIMPLEMENTED,
        ) from None
    try:
        with cupy.cuda.Device(device):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(c.cuda_handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
    except Exception as exc:  # noqa: BLE001 - CUDA reports bad handles as various errors
        log.warning("opening a CUDA IPC handle on device %d failed: %s", device, exc)
        raise InvalidInput("failed to open the CUDA shared memory region: invalid args") from None
    size = _allocation_size(ptr)
    if size is not None and size < c.region_bytes:
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        raise InvalidInput(
            f"the CUDA shared memory region was registered with {c.region_bytes} bytes but its allocation has {size}"
        )
    return _CudaRegion(ptr, device, c.region_bytes)


def _allocation_size(ptr: int) -> int | None:
    """Bytes from ``ptr`` to the end of its allocation (driver ``cuMemGetAddressRange``);
    ``None`` when the driver library cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    fn = lib.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    if fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
        return None
    return int(base.value + size.value - ptr)
