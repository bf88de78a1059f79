"""The GPU data path of a PyTorch instance: one batch in, one batch out, on the instance's
own CUDA stream.

Inputs: inputs from client system shared memory are read by the worker straight into the
pinned (page-locked) staging buffer (``host_input``, between ``begin_inputs`` and ``gather``)
and go up from there. Other host arrays (views of the router's arena, inline frames, mapped
client regions) are copied once into the pinned buffer, packed input after input in the
layout of one device buffer. Either way each run of adjacent host bytes reaches the device
in one asynchronous copy; inputs already on a GPU (CUDA shared memory) are copied device to
device into their place (those on the instance's GPU by one kernel launch for the batch,
``workers.cudacopy``), or used where they lie when the batch is that one request. No
per-request host concatenation.

Outputs: each output tensor of the batch is copied device to host once, asynchronously,
into a pinned output buffer; the stream is synchronized once and the worker gets numpy
views of that buffer, which it slices per request. Outputs that every request of the batch
wants in a CUDA region stay on the device (``DeviceView``s of the tensor, copied device to
device by the worker).

The staging and device buffers grow to the largest batch seen and are then reused: the
instance allocates nothing per batch but the model's own tensors (PyTorch's caching
allocator). The pinned buffers come in two sets, used by alternate batches: a batch may be
launched (``record``) and its next one staged and launched before the first is finished
(``wait``), so the worker reads a batch's requests while the GPU computes the one before
(``PyTorchBackend.launch``). Views of a batch's output buffer stay valid until the batch
after next begins. The device input buffer is one: the instance's stream orders its use.

With ``device`` the CPU and ``pin`` false the same code runs without CUDA (unit tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shoal.proto.errors import InvalidInput
from shoal.workers.cudacopy import SegmentCopier
from shoal.workers.devview import DeviceView, address, as_cupy, device_of
from shoal.workers.tensors import is_device_array

ALIGN = 256
"""Byte alignment of each tensor in the staging and device buffers."""
INPUT_ALIGN = 8
"""Byte alignment of each request's input read into the pinned staging (``host_input``):
small, so that the inputs of consecutive requests lie end to end there, as they will in the
device buffer, and go up in one copy. At ``ALIGN`` a 64-byte input left gaps and cost a
copy a request (about 40 us each on the H200 host)."""
CHUNK_BYTES = 1 << 20
"""Host inputs are staged in pieces of at most this many bytes."""
STAGING_THREADS = 4
"""Threads copying a large batch's host inputs into the pinned buffer."""
PARALLEL_BYTES = 4 << 20
"""Host bytes of a batch from which the staging copies run on ``STAGING_THREADS`` threads."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _address(a: Any) -> int:
    """Where a numpy array's data starts."""
    return int(a.__array_interface__["data"][0])


def _runs(copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(source, destination, bytes) copies with adjacent neighbours on both sides joined."""
    out: list[tuple[int, int, int]] = []
    for src, dst, n in copies:
        if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((src, dst, n))
    return out


class _Buffer:
    """A byte buffer that grows (doubling) and hands out regions until ``reset``. A region
    handed out stays valid when the buffer grows later (the old storage lives on as long
    as the region's tensor, or array, does)."""

    def __init__(self, torch: Any, device: Any, pin: bool) -> None:
        self._torch = torch
        self._device = device
        self._pin = pin
        self.data: Any = None
        self.array: np.ndarray[Any, Any] | None = None
        """A host buffer's bytes as numpy: ``host_input`` slices it (0.4 us a request on the
        development box, where a torch slice and its ``numpy()`` took 2.9 us)."""
        self.capacity = 0
        self.used = 0
        self.allocations = 0
        """How many times storage was allocated (tests: no growth in steady state)."""

    def reset(self) -> None:
        self.used = 0

    def place(self, nbytes: int, align: int = ALIGN) -> int:
        """Where the next ``nbytes`` go, their start ``align``-aligned (``ALIGN`` divides by
        it); grows the buffer if need be (they then start at 0 of the new storage)."""
        start = (self.used + align - 1) // align * align
        if start + nbytes > self.capacity:
            size = max(2 * self.capacity, _aligned(nbytes), 1 << 20)
            self.data = self._torch.empty(size, dtype=self._torch.uint8, device=self._device, pin_memory=self._pin)
            self.array = self.data.numpy() if self.data.device.type == "cpu" else None
            self.capacity = size
            self.allocations += 1
            start = 0
        self.used = start + nbytes
        return start

    def take(self, nbytes: int, align: int = ALIGN) -> Any:
        """A uint8 tensor of ``nbytes`` (``place``)."""
        start = self.place(nbytes, align)
        return self.data[start : start + nbytes]


class TorchDevicePath:
    """Staging buffers and the CUDA stream of one instance (see the module docstring)."""

    def __init__(self, torch: Any, device: Any, *, pin: bool = True, priority: int = 0) -> None:
        self._torch = torch
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.stream: Any = torch.cuda.Stream(device, priority=priority) if self.on_gpu else None
        self._host_in = (_Buffer(torch, "cpu", pin), _Buffer(torch, "cpu", pin))
        self._host_out = (_Buffer(torch, "cpu", pin), _Buffer(torch, "cpu", pin))
        self._slot = 0
        self.host_in = self._host_in[0]
        """The pinned input staging of the current batch."""
        self.host_out = self._host_out[0]
        """The pinned output buffer of the current batch."""
        self.device_in = _Buffer(torch, device, False)
        self._dtypes: dict[np.dtype[Any], Any] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.parallel_bytes = PARALLEL_BYTES
        self._inputs_open = False
        self._claimed = False
        self._index = -1
        """The instance's CUDA device ordinal (-1: the CPU)."""
        if self.on_gpu:
            self._index = device.index if device.index is not None else torch.cuda.current_device()
        self.copier = SegmentCopier()
        self._cupy_stream: Any = None
        self._numpy_dtypes: dict[Any, np.dtype[Any]] = {}

    def _claim(self) -> None:
        """The other set of pinned buffers, for a new batch (the last batch's may still be in
        flight: launched, not waited for)."""
        self._slot ^= 1
        self.host_in = self._host_in[self._slot]
        self.host_out = self._host_out[self._slot]
        self.host_in.reset()
        self.host_out.reset()

    def begin_inputs(self) -> None:
        """A batch's inputs are about to be read: ``host_input`` hands out pinned memory
        until the next ``gather``."""
        self._claim()
        self._claimed = self._inputs_open = True

    def host_input(self, nbytes: int) -> memoryview:
        """``nbytes`` of pinned staging memory for one input of the coming batch."""
        if not self._inputs_open:
            self.begin_inputs()
        host = self.host_in
        start = host.place(nbytes, INPUT_ALIGN)
        assert host.array is not None  # a host buffer
        return host.array[start : start + nbytes].data

    def begin(self) -> None:
        """A new batch (``execute``), unless ``begin_inputs`` began it: the output views of
        the batch before the last one are no longer used."""
        if not self._claimed:
            self._claim()
        self._claimed = False

    def record(self) -> Any:
        """Marks the end of the work queued so far on the stream (``wait`` for it)."""
        if self.stream is None:
            return None
        event = self._torch.cuda.Event()
        event.record(self.stream)
        return event

    @staticmethod
    def done(mark: Any) -> bool:
        """Whether the work before ``mark`` is done (does not wait)."""
        return mark is None or bool(mark.query())

    @staticmethod
    def wait(mark: Any) -> None:
        """Until the work before ``mark`` (``record``) is done."""
        if mark is not None:
            mark.synchronize()

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Makes the instance's stream current."""
        if self.stream is None:
            return contextlib.nullcontext()
        return self._torch.cuda.stream(self.stream)  # type: ignore[no-any-return]

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def torch_dtype(self, dtype: np.dtype[Any], name: str) -> Any:
        found = self._dtypes.get(dtype)
        if found is None:
            if dtype == np.object_:
                raise InvalidInput(f"input '{name}': BYTES inputs are not supported by the PyTorch backend")
            try:
                found = self._torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            except TypeError:
                raise InvalidInput(f"input '{name}': datatype {dtype} is not supported by PyTorch") from None
            self._dtypes[dtype] = found
        return found

    # ---- inputs -------------------------------------------------------------------------------

    def gather(self, parts: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """One device tensor per input: ``parts[name]`` holds each request's array (numpy, or
        a CuPy array or ``DeviceView`` for CUDA shared memory), joined along dimension 0 when
        there are several. Call inside ``context()``; the copies are asynchronous on the
        instance's stream."""
        torch = self._torch
        out: dict[str, Any] = {}
        layout: list[tuple[str, int, tuple[int, ...], Any, Sequence[Any]]] = []
        total = 0
        for name, arrays in parts.items():
            first = arrays[0]
            if len(arrays) == 1 and is_device_array(first) and self.on_gpu:
                tensor = torch.from_dlpack(as_cupy(first))  # CUDA shared memory: used where it lies
                out[name] = tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=True)
                continue
            dtype = first.dtype
            tail = tuple(first.shape[1:])
            rows = 0
            for a in arrays:
                if a.dtype != dtype or tuple(a.shape[1:]) != tail:
                    raise InvalidInput(f"input '{name}': the requests of a batch differ in datatype or shape")
                rows += int(a.shape[0]) if a.ndim else 1
            shape = tuple(first.shape) if len(arrays) == 1 else (rows, *tail)
            nbytes = math.prod(shape) * dtype.itemsize
            layout.append((name, total, shape, dtype, arrays))
            total = _aligned(total + nbytes)
        placed = self.host_in.data if self._inputs_open else None  # inputs read into it by host_input
        if not self._inputs_open:
            self.host_in.reset()
        self._inputs_open = False
        if not layout:
            return out
        base = placed.data_ptr() if placed is not None else 0
        limit = base + self.host_in.used if placed is not None else 0
        self.device_in.reset()
        dev = self.device_in.take(total)
        chunks: list[tuple[int, Any]] = []  # (offset, bytes) of host data to stage, in layout order
        direct: list[tuple[int, int, int]] = []  # (pinned offset, device offset, bytes) already staged
        on_device: list[tuple[int, int, int]] = []  # (device address, source address, bytes): one launch
        dev_ptr = dev.data_ptr() if self.stream is not None else 0
        for name, offset, shape, dtype, arrays in layout:
            tdtype = self.torch_dtype(dtype, name)
            pos = offset
            for a in arrays:
                n = int(a.nbytes)
                if n == 0:
                    continue
                if is_device_array(a):
                    if dev_ptr and a.flags.c_contiguous and device_of(a) == self._index:
                        on_device.append((dev_ptr + pos, address(a), n))
                    else:
                        self._copy_device(dev, pos, a, n)
                elif base <= (addr := _address(a)) and addr + n <= limit and a.flags.c_contiguous:
                    direct.append((addr - base, pos, n))
                else:
                    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                    for k in range(0, n, CHUNK_BYTES):
                        chunks.append((pos + k, flat[k : k + CHUNK_BYTES]))
                pos += n
            end = offset + math.prod(shape) * dtype.itemsize
            out[name] = dev[offset:end].view(tdtype).view(shape)
        if on_device:
            self._copy_segments(on_device)
        for start, to, n in _runs(direct):
            assert placed is not None  # direct copies come from it
            dev[to : to + n].copy_(placed[start : start + n], non_blocking=True)
        if chunks:
            self._stage(chunks, self.host_in.take(total), dev)
        return out

    def _copy_segments(self, segments: list[tuple[int, int, int]]) -> None:
        """Copies within the instance's GPU, on its stream, in one kernel launch
        (``workers.cudacopy``): a batch's inputs in CUDA shared memory."""
        import cupy

        if self._cupy_stream is None:
            self._cupy_stream = cupy.cuda.ExternalStream(self.stream.cuda_stream, self._index)
        with cupy.cuda.Device(self._index):
            self.copier.copy(segments, self._cupy_stream)

    def _copy_device(self, dev: Any, pos: int, a: Any, n: int) -> None:
        """One request's CUDA-shared-memory input into its place in the device buffer: a raw
        asynchronous copy on the instance's stream (no DLPack tensor per request)."""
        if self.stream is None or not a.flags.c_contiguous:
            src = self._torch.from_dlpack(as_cupy(a)).reshape(-1).view(self._torch.uint8)
            dev[pos : pos + n].copy_(src, non_blocking=True)
            return
        import cupy

        rt = cupy.cuda.runtime
        rt.memcpyAsync(dev.data_ptr() + pos, address(a), n, rt.memcpyDefault, self.stream.cuda_stream)

    def _stage(self, chunks: list[tuple[int, Any]], host: Any, dev: Any) -> None:
        """Copy ``chunks`` into the pinned buffer and up to the device. Large batches are
        copied by ``STAGING_THREADS`` threads (numpy releases the GIL), each group going up
        as soon as it is staged, so the copies to the device overlap the host copies."""
        host_np = host.numpy()
        nbytes = sum(int(c.nbytes) for _, c in chunks)
        threads = min(STAGING_THREADS, len(chunks)) if nbytes >= self.parallel_bytes else 1
        groups: list[list[tuple[int, Any]]] = [[] for _ in range(threads)]
        share, filled, g = nbytes / threads, 0, 0
        for chunk in chunks:
            if filled >= share * (g + 1) and g < threads - 1:
                g += 1
            groups[g].append(chunk)
            filled += int(chunk[1].nbytes)

        def copy(group: list[tuple[int, Any]]) -> None:
            for pos, data in group:
                host_np[pos : pos + data.nbytes] = data

        if threads == 1:
            copy(chunks)
            done: list[Any] = [None]
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(STAGING_THREADS, thread_name_prefix="shoal-stage")
            done = [self._pool.submit(copy, group) for group in groups]
        for group, future in zip(groups if threads > 1 else [chunks], done, strict=True):
            if future is not None:
                future.result()
            start = end = -1
            for pos, data in group:  # one copy up per run of adjacent host bytes
                if pos != end:
                    if end > start:
                        dev[start:end].copy_(host[start:end], non_blocking=True)
                    start = pos
                end = pos + int(data.nbytes)
            if end > start:
                dev[start:end].copy_(host[start:end], non_blocking=True)

    # ---- outputs ------------------------------------------------------------------------------

    def fetch(
        self, values: Mapping[str, Any], keep_on_device: frozenset[str] | set[str], *, kept_copied: bool = False
    ) -> dict[str, Any]:
        """The outputs as numpy views of the pinned output buffer (one device-to-host copy
        each, on the instance's stream), or as ``DeviceView``s for ``keep_on_device`` (copies
        when ``kept_copied``: a CUDA graph's static outputs, which its next replay
        overwrites). Call inside ``context()``, then ``synchronize()`` before using them."""
        out: dict[str, Any] = {}
        plan: list[tuple[str, Any, int, int]] = []
        total = 0
        for name, value in values.items():
            t = value.detach()
            if self.on_gpu and t.device.type != "cuda":  # the model returned a host tensor
                out[name] = t.contiguous().numpy()
                continue
            if name in keep_on_device:
                kept = self._on_device(t.clone() if kept_copied else t)
                if kept is not None:
                    out[name] = kept
                    continue
            n = int(t.numel()) * int(t.element_size())
            plan.append((name, t, total, n))
            total = _aligned(total + n)
        if plan:
            host = self.host_out.take(total)
            for name, t, offset, n in plan:
                dst = host[offset : offset + n].view(t.dtype).view(t.shape)
                dst.copy_(t, non_blocking=True)
                out[name] = dst.numpy()
        return out

    def _on_device(self, t: Any) -> Any:
        """A ``DeviceView`` of the output tensor ``t`` (kept alive by it; its requests' parts
        are views too, ``BatchedBackend.split``), or None for a type CuPy lacks (bfloat16:
        through the host) or without CuPy. Made from the tensor's pointer rather than by
        DLPack, which costs more (stream events) and orders nothing needed: the batch's stream
        is waited for before its outputs are used."""
        try:
            import cupy  # noqa: F401 - whoever writes the view out uses it
        except ImportError:
            return None
        staged = self.device_in.data
        if staged is not None and t.untyped_storage().data_ptr() == staged.untyped_storage().data_ptr():
            t = t.clone()  # an input handed back: the next batch reuses that buffer
        t = t.contiguous()
        dtype = self._numpy_dtypes.get(t.dtype)
        if dtype is None:
            try:
                dtype = self._numpy_dtypes[t.dtype] = self._torch.empty(0, dtype=t.dtype).numpy().dtype
            except TypeError:
                return None
        return DeviceView(t.data_ptr(), tuple(t.shape), dtype, t.device.index, t)
