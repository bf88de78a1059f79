"""Tensor bytes <-> numpy arrays in a worker: inline frames and shared-memory blocks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.framing import overflow
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper
from shoal.workers.clientshm import ClientRegions
from shoal.workers.cudaarena import CudaArena
from shoal.workers.devview import DeviceView

Array = npt.NDArray[Any]
SMALL_COPY_BYTES = 1024
"""Inline outputs up to this size are copied into the message (``tobytes``), bigger ones
referenced (a memoryview of the array)."""
_FIXED: dict[Any, dtypes.DType] = {
    d.numpy: d for d in dtypes.BY_PROTOCOL.values() if d.numpy is not None and d.protocol != "BYTES"
}
"""Fixed-size little-endian (or one-byte) numpy dtypes: the fast path of ``OutputWriter.write``."""


def is_device_array(obj: object) -> bool:
    """A CuPy array or a ``DeviceView`` (GPU memory)."""
    cls = type(obj)
    return cls is DeviceView or cls.__module__.split(".", 1)[0] == "cupy"


def read_input(
    ref: wpb.TensorRef,
    frames: list[bytes],
    mapper: Mapper,
    regions: ClientRegions,
    device_ok: bool = False,
    into: Callable[[int], memoryview] | None = None,
    views: bool = False,
) -> Array:
    """A numpy view (no copy for fixed-size types) of one input tensor. Inputs in client CUDA
    memory are CuPy arrays over that memory when ``device_ok`` (``DeviceView``s with
    ``views``), else copied to the host. Fixed-size inputs in client system memory are
    copied into ``into(nbytes)`` when given (the backend's staging memory), else into fresh
    memory."""
    dt = dtypes.by_protocol(ref.datatype)
    shape = tuple(ref.shape)
    which = ref.WhichOneof("location")
    if which == "client" and ref.client.device >= 0 and device_ok and dt.numpy is not None and dt.protocol != "BYTES":
        count = dtypes.element_count(shape)
        if ref.client.nbytes != count * dt.itemsize:
            raise InvalidInput(f"input '{ref.name}' has {ref.client.nbytes} bytes, expected {count * dt.itemsize}")
        if views:
            return regions.device_view(ref.client, dt.numpy, shape)  # type: ignore[return-value]
        return regions.device_array(ref.client, dt.numpy, shape)  # type: ignore[no-any-return]
    buf: bytes | memoryview
    if which == "frame":
        buf = frames[ref.frame]
    elif which == "shm":
        s = ref.shm
        buf = mapper.view(Block(s.region, s.offset, s.nbytes, s.device))
    elif which == "client":
        c = ref.client
        if c.device >= 0:
            buf = regions.read_cuda_to_host(c)
        else:
            buf = regions.read_host(c, into if dt.numpy is not None and dt.protocol != "BYTES" else None)
    else:
        raise InvalidInput(f"input '{ref.name}' carries no data")
    count = dtypes.element_count(shape)
    if dt.protocol == "BYTES":
        return dtypes.deserialize_bytes(buf, count, name=ref.name).reshape(shape)
    if dt.numpy is None:
        raise ServingError(
            f"datatype {dt.protocol} needs the ml_dtypes package in the model's Python environment",
            code=ErrorCode.UNIMPLEMENTED,
        )
    if len(buf) != count * dt.itemsize:
        raise InvalidInput(f"input '{ref.name}' has {len(buf)} bytes, expected {count * dt.itemsize}")
    return np.frombuffer(buf, dtype=dt.numpy).reshape(shape)


class OutputWriter:
    """Turns output arrays into ``TensorRef``s: small ones as frames, large ones in the
    worker-owned output ``arena`` (the router reads them and sends ``Release``), or as frames
    too when the arena has no room for them (``framing.overflow``)."""

    def __init__(self, arena: Arena, inline_max_bytes: int, regions: ClientRegions, lock: Any = None) -> None:
        self.arena = arena
        self.inline_max_bytes = inline_max_bytes
        self._small = min(SMALL_COPY_BYTES, inline_max_bytes)
        self.regions = regions
        self.lock = lock if lock is not None else threading.RLock()
        """Held to allocate in the arena and to write client regions (they are shared with the
        worker's other threads); inline outputs need no lock."""
        self.device_arena: CudaArena | None = None
        """A GPU instance's CUDA arena: outputs asked for ``on_gpu`` that the backend left on
        the device go there."""
        self.blocks_out = 0
        """Arena blocks (host or CUDA) written so far: whoever sends the refs compares it
        before and after, to look for blocks only when there are some."""

    def write(
        self,
        name: str,
        array: Array,
        expect: dtypes.DType | None,
        ref: wpb.TensorRef,
        frames: list[Any],
        dest: wpb.ClientShm | None = None,
        on_gpu: bool = False,
    ) -> None:
        """``dest``: the client region the request asked this output to be written to.
        ``on_gpu``: the output may stay on the GPU (an ensemble step on a GPU reads it): a
        device array goes into the CUDA arena when there is room."""
        if array.__class__ is np.ndarray:
            dt = _FIXED.get(array.dtype)
            if dt is not None and dest is None and array.nbytes <= self._small and array.flags.c_contiguous:
                # the common case of a streamed response: a few bytes, copied into the message
                if expect is not None and expect is not dt:
                    self._check_type(name, dt, expect)
                ref.name = name
                ref.datatype = dt.protocol
                ref.shape.extend(array.shape)
                ref.frame = len(frames)
                frames.append(array.tobytes())
                return
            arr = array
        elif is_device_array(array):
            if dest is not None and dest.device >= 0:
                dt = dtypes.from_numpy(array.dtype)
                self._check_type(name, dt, expect)
                ref.name, ref.datatype = name, dt.protocol
                ref.shape.extend(array.shape)
                self._write_client(name, array, int(array.nbytes), dest, ref)
                return
            if on_gpu and dest is None and self.device_arena is not None:
                if self._write_device(name, array, expect, ref):
                    return
            arr = np.asarray(array.get())  # type: ignore[attr-defined]  # CuPy: one device-to-host copy
        else:
            arr = np.asarray(array)
        dt = dtypes.from_numpy(arr.dtype)
        self._check_type(name, dt, expect)
        ref.name = name
        ref.datatype = dt.protocol
        ref.shape.extend(arr.shape)
        data: Any
        if dt.protocol == "BYTES":
            data = dtypes.serialize_bytes(arr)
            nbytes = len(data)
        else:
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            data = arr
            nbytes = arr.nbytes
        if dest is not None:
            self._write_client(name, data, nbytes, dest, ref)
            return
        if nbytes <= self.inline_max_bytes:
            ref.frame = len(frames)
            if isinstance(data, bytes):
                frames.append(data)
            elif nbytes <= SMALL_COPY_BYTES:
                frames.append(data.tobytes())  # cheaper than a view of the array, for a few bytes
            else:
                frames.append(data.data.cast("B"))
            return
        with self.lock:
            block: Block | None = None
            try:
                block = self.arena.allocate(nbytes)
            except ServingError as exc:
                overflow(frames, nbytes, exc, "an output")  # no room: in the message
            if block is not None:
                view = self.arena.view(block)
                self.blocks_out += 1
        if block is None:
            ref.frame = len(frames)
            frames.append(data if isinstance(data, bytes) else data.data.cast("B"))
            return
        _copy_into(view, data)
        s = ref.shm
        s.region = block.region
        s.offset = block.offset
        s.nbytes = block.nbytes
        s.device = block.device

    def _write_device(self, name: str, array: Any, expect: dtypes.DType | None, ref: wpb.TensorRef) -> bool:
        """Copy the device ``array`` into the CUDA arena and describe it in ``ref``; False
        when the arena is full (the caller copies it to the host)."""
        arena = self.device_arena
        assert arena is not None
        dt = dtypes.from_numpy(array.dtype)
        self._check_type(name, dt, expect)
        with self.lock:
            got = arena.allocate(int(array.nbytes))
            if got is None:
                return False
            block, handle, segment_bytes = got
            self.blocks_out += 1
            arena.copy_in(block, array)
        ref.name, ref.datatype = name, dt.protocol
        ref.shape.extend(array.shape)
        s = ref.shm
        s.region, s.offset, s.nbytes, s.device = block.region, block.offset, block.nbytes, block.device
        s.cuda_handle = handle
        s.segment_bytes = segment_bytes
        return True

    @staticmethod
    def _check_type(name: str, dt: dtypes.DType, expect: dtypes.DType | None) -> None:
        if expect is not None and expect.protocol != dt.protocol:
            raise ServingError(
                f"output '{name}' has datatype {dt.protocol} but the model configuration says {expect.protocol}",
                code=ErrorCode.INTERNAL,
            )

    def _write_client(self, name: str, data: Any, nbytes: int, dest: wpb.ClientShm, ref: wpb.TensorRef) -> None:
        if nbytes > dest.nbytes:
            raise T.SHM_OUTPUT_TOO_SMALL(name=name, size=dest.nbytes, needed=nbytes)
        if dest.device < 0:
            if is_device_array(data):
                data = data.get()
            with self.lock:
                self.regions.write_host(dest, data, nbytes)
        else:
            with self.lock:
                self.regions.write_cuda(dest, data, nbytes)
        ref.client.CopyFrom(dest)
        ref.client.nbytes = nbytes


def _copy_into(view: memoryview, data: Any) -> None:
    """Copy serialized bytes or an array into ``view``, then release the view."""
    try:
        if isinstance(data, bytes):
            view[:] = data
        else:
            np.copyto(np.frombuffer(view, dtype=data.dtype).reshape(data.shape), data)
    finally:
        view.release()
