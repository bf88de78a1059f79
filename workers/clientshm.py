"""``ClientRegions``: a worker's access to client shared-memory regions.

System regions are POSIX shm objects the client created. The worker opens each by key once
(``shm.client``: regular files only, and the very object the router checked at
registration) and keeps the descriptor, at most ``MAX_OPEN`` of them (least recently used
closed first). Bytes are copied with ``preadv``/``pwritev``: a client that truncates its
object under a request, or a full ``/dev/shm`` under a sparse one, fails that request
instead of raising SIGBUS in this process. Inputs are therefore one copy in the worker (the
router still copies nothing).

CUDA regions are CUDA IPC handles; the worker opens each once with CuPy (imported only
when a CUDA region is used) and caches the device pointer. A CPU backend gets a host copy
of a CUDA input (one device-to-host copy, here in the worker); outputs are copied into
the region and the copy is synchronized before the worker replies.

The router sends ``Forget`` once a region is unregistered and no request uses it; the
descriptor or mapping is then closed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.proto import errortexts as T
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm import client as shm_client
from shoal.workers.cudacopy import SegmentCopier
from shoal.workers.devview import DeviceView, address, device_of

log = logging.getLogger("shoal.worker.shm")

MAX_OPEN = 256
"""Descriptors of client system regions a worker keeps open (at most a quarter of its
descriptor limit)."""
_TRUNCATED = "the shared memory region is now smaller than when it was registered"
READ_THREADS = 4
"""Threads reading a batch's large inputs into a backend's staging memory (``read_host``
with ``into``, then ``finish_reads``): a batch of 32 images of 600 KB is ~19 MB that one
thread reads in ~3 ms. The worker's own thread reads one share; one large input alone is
read on it (handing it to another thread costs ~0.2 ms of wake-ups, measured on an H200 host)."""
THREADED_READ_BYTES = 256 << 10
"""Inputs from this size wait for ``finish_reads`` (smaller ones are read at once)."""


class _SystemRegion:
    """An open client object: a descriptor (copies), or a mapping (``mapped`` mode)."""

    __slots__ = ("fd", "end", "mm", "sized_in")

    def __init__(self, fd: int, end: int, mm: mmap.mmap | None = None) -> None:
        self.fd = fd
        self.end = end
        self.mm = mm
        self.sized_in = -1
        """The batch of writes its size was last checked for (``write_host``)."""

    def size(self) -> int:
        return self.mm.size() if self.mm is not None else os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                # a backend still holds an input view; the mapping goes with the last one
                log.debug("a client region is still referenced; unmapped when the last view goes")
        else:
            os.close(self.fd)


class _CudaRegion:
    __slots__ = ("ptr", "device", "nbytes", "memptr")

    def __init__(self, ptr: int, device: int, nbytes: int) -> None:
        self.ptr = ptr
        self.device = device
        self.nbytes = nbytes
        self.memptr: Any = None
        """A CuPy pointer to the region's start (``device_array``'s arrays are offsets of it)."""

    def close(self) -> None:
        import cupy

        with cupy.cuda.Device(self.device):
            cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)


class ClientRegions:
    """``mapped``: map system regions and use them in place (no input copy; a client that
    truncates its object during a request can kill this process with SIGBUS), as the
    ``--client-shm-mapped`` option asks; else copy through descriptors."""

    def __init__(self, max_open: int = 0, *, mapped: bool = False) -> None:
        self.mapped = mapped
        self.max_open = max_open or min(MAX_OPEN, max(8, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        self._system: OrderedDict[int, _SystemRegion] = OrderedDict()
        self._cuda: dict[int, _CudaRegion] = {}
        self.gpu_order: list[int] = []
        """Server GPU ordinals in this worker's CUDA order (empty: the same order)."""
        self._copy_streams: dict[int, Any] = {}
        """CUDA stream per device for ``write_cuda`` (non-blocking: other work does not wait)."""
        self._writes: list[tuple[Any, Any]] = []
        """(stream, source kept alive) of the copies ``finish_writes`` waits for."""
        self._device_writes: list[tuple[int, int, Any, int]] = []
        """(region device, destination, CuPy source, bytes): the copies of device data
        ``finish_writes`` makes, a batch at a time."""
        self._copier = SegmentCopier()
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[tuple[int, int, memoryview]] = []
        """Reads ``finish_reads`` does: (descriptor, offset, destination)."""
        self._write_batch = 0
        """Counts the batches of writes (``finish_writes`` ends one)."""

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
        if region is not None:
            self._system.move_to_end(c.region_id)
            return region
        try:
            fd, ident = shm_client.open_object(c.key)
        except OSError as exc:
            log.debug("cannot open client shm key %r: %s", c.key, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise ServingError(
                    "the instance has no descriptor left to open the shared memory region; retry later",
                    code=ErrorCode.RESOURCE_EXHAUSTED,
                ) from None
            raise ServingError(
                "unable to open the shared memory region: its key no longer exists", code=ErrorCode.NOT_FOUND
            ) from None
        if c.object_inode and (ident.device, ident.inode) != (c.object_device, c.object_inode):
            os.close(fd)
            log.warning("client shm key %r names another object than the one registered", c.key)
            raise ServingError(
                "the shared memory region's key names another object than the one registered; register it again",
                code=ErrorCode.FAILED_PRECONDITION,
            )
        while len(self._system) >= self.max_open:
            self.finish_reads()  # no read in flight on a descriptor about to close
            _, old = self._system.popitem(last=False)
            old.close()
        end = c.region_offset + c.region_bytes
        mm = None
        if self.mapped:
            try:
                if ident.size < end:
                    raise InvalidInput(_TRUNCATED)
                mm = mmap.mmap(fd, end)  # holds its own descriptor
            finally:
                os.close(fd)
            fd = -1
        region = _SystemRegion(fd, end, mm)
        self._system[c.region_id] = region
        return region

    def _span(self, c: wpb.ClientShm, nbytes: int) -> int:
        """Where the tensor's ``nbytes`` start in the object (bounds checked)."""
        if c.offset + nbytes > c.region_bytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        return c.region_offset + c.offset

    def read_host(self, c: wpb.ClientShm, into: Callable[[int], memoryview] | None = None) -> memoryview:
        """A private copy of the tensor's bytes (a truncated object is an error, not SIGBUS),
        in ``into(nbytes)`` when given, else in fresh memory. With ``mapped`` regions: a view
        of the mapping."""
        start = self._span(c, c.nbytes)
        region = self._system_region(c)
        if region.mm is not None:
            if region.size() < region.end:
                raise InvalidInput(_TRUNCATED)
            return memoryview(region.mm)[start : start + c.nbytes]
        if into is None:
            out = np.empty(c.nbytes, dtype=np.uint8).data
        else:
            out = into(c.nbytes)
            if c.nbytes >= THREADED_READ_BYTES:
                self._pending.append((region.fd, start, out))
                return out  # its bytes are there once finish_reads returns
        if shm_client.read_into(region.fd, start, out) != c.nbytes:
            raise InvalidInput(_TRUNCATED)
        return out

    def finish_reads(self) -> None:
        """Do the reads ``read_host`` left pending, several on threads; raises if one came
        short (after all of them have finished: none writes into memory handed out again)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        shares = [pending[k::READ_THREADS] for k in range(min(READ_THREADS, len(pending)))]
        futures = []
        if len(shares) > 1:
            if self._readers is None:
                self._readers = concurrent.futures.ThreadPoolExecutor(READ_THREADS - 1, thread_name_prefix="shoal-read")
            futures = [self._readers.submit(_read_all, share) for share in shares[1:]]
        complete = _read_all(shares[0])
        for f in futures:
            complete = f.result() and complete
        if not complete:
            raise InvalidInput(_TRUNCATED)

    def write_host(self, c: wpb.ClientShm, data: Any, nbytes: int) -> None:
        """Copy ``nbytes`` of ``data`` (bytes or a C-contiguous array) to the tensor's place."""
        start = self._span(c, nbytes)
        region = self._system_region(c)
        if nbytes == 0:
            return
        if region.sized_in != self._write_batch:  # once a batch: an fstat a write was 8% of a CPU batch
            if region.size() < region.end:
                raise InvalidInput(_TRUNCATED)
            region.sized_in = self._write_batch
        if isinstance(data, bytes):
            view = memoryview(data)
        else:
            view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        if region.mm is not None:
            target = memoryview(region.mm)[start : start + nbytes]
            try:
                target[:] = view[:nbytes]
            finally:
                target.release()
            return
        try:
            shm_client.write_from(region.fd, start, view[:nbytes])
        except OSError as exc:
            raise ServingError(
                f"cannot write the output into the shared memory region: {exc.strerror or exc}",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            ) from None

    # ---- CUDA memory --------------------------------------------------------------------------

    def _cuda_region(self, c: wpb.ClientShm) -> _CudaRegion:
        region = self._cuda.get(c.region_id)
        if region is None:
            region = _open_ipc(c, self.local_device(c.device))
            self._cuda[c.region_id] = region
        return region

    def open(self, c: wpb.ClientShm) -> None:
        """Open the region now (registration-time check); raises as a use would."""
        if c.device >= 0:
            self._cuda_region(c)
        else:
            self._system_region(c)

    def _cuda_span(self, c: wpb.ClientShm, nbytes: int) -> Any:
        """The CUDA region of ``c``, checked to hold ``nbytes`` at its offset."""
        region = self._cuda_region(c)
        if c.offset + nbytes > region.nbytes:
            raise InvalidInput("shared memory offset + byte size is outside the registered region")
        return region

    def device_array(self, c: wpb.ClientShm, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A CuPy array of ``shape`` over the tensor's bytes in the CUDA region (no copy)."""
        import cupy

        region = self._cuda_span(c, c.nbytes)
        base = region.memptr
        if base is None:
            mem = cupy.cuda.UnownedMemory(region.ptr, region.nbytes, region, device_id=region.device)
            base = region.memptr = cupy.cuda.MemoryPointer(mem, 0)
        return cupy.ndarray(shape, dtype=dtype, memptr=base + c.offset)

    def device_view(self, c: wpb.ClientShm, dtype: Any, shape: tuple[int, ...]) -> DeviceView:
        """``device_array`` as a ``DeviceView`` (the tensor's address: no CuPy object)."""
        region = self._cuda_span(c, c.nbytes)
        return DeviceView(region.ptr + c.offset, shape, dtype, region.device, region)

    def read_cuda_to_host(self, c: wpb.ClientShm) -> memoryview:
        """The tensor's bytes copied to host memory."""
        import cupy

        region = self._cuda_span(c, c.nbytes)
        out = np.empty(c.nbytes, dtype=np.uint8)
        with cupy.cuda.Device(region.device):
            cupy.cuda.runtime.memcpy(out.ctypes.data, region.ptr + c.offset, c.nbytes, cupy.cuda.runtime.memcpyDefault)
        return out.data

    def write_cuda(self, c: wpb.ClientShm, data: Any, nbytes: int) -> None:
        """Copy ``data`` (host bytes / numpy array, or a CUDA array) into the region,
        asynchronously on a copy stream of the region's device; ``finish_writes`` waits for
        every such copy (once per batch, before its reply goes out). Copies from device
        memory are made by ``finish_writes``, all of a batch's at once (``SegmentCopier``)."""
        import cupy

        region = self._cuda_span(c, nbytes)
        if nbytes == 0:
            return
        if data.__class__ is DeviceView:
            self._device_writes.append((region.device, region.ptr + c.offset, data, nbytes))
            return
        if isinstance(data, cupy.ndarray):
            if not data.flags.c_contiguous:
                with cupy.cuda.Device(data.device.id):
                    data = cupy.ascontiguousarray(data)  # on the default stream, before the copy's wait
            self._device_writes.append((region.device, region.ptr + c.offset, data, nbytes))
            return
        keep = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)
        with cupy.cuda.Device(region.device):
            stream = self._copy_stream(region.device)
            kind = cupy.cuda.runtime.memcpyDefault
            cupy.cuda.runtime.memcpyAsync(region.ptr + c.offset, keep.ctypes.data, nbytes, kind, stream.ptr)
        self._writes.append((stream, keep))

    def _copy_stream(self, device: int) -> Any:
        """The copy stream of ``device`` (call with it current), of the highest priority:
        the copies of a batch's outputs are made while the next batch computes (pipelined
        instances), and the worker waits for them before it answers. At the default priority
        the copy kernel waited for the next batch's kernels to free the GPU's multiprocessors:
        18% of a pipelined worker's main thread waited in ``finish_writes`` (H200, resnet18,
        c=256 over CUDA shared memory)."""
        stream = self._copy_streams.get(device)
        if stream is None:
            import cupy

            try:  # CUDA clamps a priority beyond its range to the highest one
                stream = cupy.cuda.Stream(non_blocking=True, priority=-(1 << 16))
            except TypeError:  # a CuPy without stream priorities
                stream = cupy.cuda.Stream(non_blocking=True)
            self._copy_streams[device] = stream
        return stream

    def _copy_device_writes(self) -> None:
        """Start the copies of device data ``write_cuda`` collected: per destination device,
        after the work queued on the legacy default stream of each source's GPU (where a
        Python model's tensor may still be being computed: PyTorch's and CuPy's default; the
        PyTorch backend's own stream was waited for already), in one kernel launch for the
        copies within that device and a ``cudaMemcpyAsync`` for each from another."""
        import cupy

        pending, self._device_writes = self._device_writes, []
        by_device: dict[int, list[tuple[int, Any, int]]] = {}
        sources: set[int] = set()
        for device, dst, data, nbytes in pending:
            by_device.setdefault(device, []).append((dst, data, nbytes))
            sources.add(device_of(data))
        made = {}
        for src_device in sources:
            with cupy.cuda.Device(src_device):
                made[src_device] = cupy.cuda.Stream.null.record()
        rt = cupy.cuda.runtime
        for device, writes in by_device.items():
            with cupy.cuda.Device(device):
                stream = self._copy_stream(device)
                for src_device in {device_of(data) for _, data, _ in writes}:
                    stream.wait_event(made[src_device])
                local = []
                for dst, data, nbytes in writes:
                    if device_of(data) == device:
                        local.append((dst, address(data), nbytes))
                    else:
                        rt.memcpyAsync(dst, address(data), nbytes, rt.memcpyDefault, stream.ptr)
                self._copier.copy(local, stream)
            self._writes.append((stream, [data for _, data, _ in writes]))

    def finish_writes(self) -> None:
        """Wait for the copies ``write_cuda`` started (each copy stream synchronized once).
        The next batch's writes check their system regions' sizes again."""
        self._write_batch += 1
        if self._device_writes:
            try:
                self._copy_device_writes()
            except Exception:
                self._wait_writes()  # nothing of the failed copies may still be running
                raise
        self._wait_writes()

    def _wait_writes(self) -> None:
        if not self._writes:
            return
        writes, self._writes = self._writes, []
        for stream in {id(s): s for s, _ in writes}.values():
            stream.synchronize()

    # ---- lifetime -----------------------------------------------------------------------------

    def forget(self, region_ids: Any) -> None:
        with contextlib.suppress(InvalidInput):  # the batch that started them reports it
            self.finish_reads()
        self.finish_writes()
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


def _read_all(reads: list[tuple[int, int, memoryview]]) -> bool:
    """Each (descriptor, offset, destination) read in full; False if any came short."""
    complete = True
    for fd, offset, out in reads:
        try:
            complete = shm_client.read_into(fd, offset, out) == len(out) and complete
        except OSError:
            complete = False
    return complete


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
        raise T.SHM_CUDA_OPEN() from None
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
