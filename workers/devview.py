"""``DeviceView``: a C-contiguous tensor in CUDA memory named by its address, for the PyTorch
backend's batched path, where a batch's inputs in client CUDA shared memory are only copied
by address into the batch's device buffer and its outputs only copied by address into the
clients' regions (``workers.cudacopy``).

DESIGN (issue 18). A CuPy array per request made the worker's main thread the wall of one
GPU instance over CUDA shared memory: building one over a region cost 2.7 us and each slice
of a batch's output 3.2 us, 11% of that thread between them (resnet18, c=256, H200), where
nothing reads those arrays but their address. A view costs a Python object. Whatever needs
a real array gets one from ``cupy()`` (zero copy, owned by the view) or through
``__cuda_array_interface__``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _Flags:
    __slots__ = ()
    c_contiguous = True


class DeviceView:
    __slots__ = ("ptr", "shape", "dtype", "device_id", "owner", "nbytes")

    flags = _Flags()

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any], device_id: int, owner: Any) -> None:
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype
        self.device_id = device_id
        self.owner = owner
        """Keeps the memory alive (a region, a torch tensor)."""
        n = dtype.itemsize
        for d in shape:
            n *= d
        self.nbytes = n

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self.nbytes // self.dtype.itemsize if self.dtype.itemsize else 0

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d device view")
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        """Rows ``start:stop`` (a view); any other index gives the CuPy array's answer."""
        if isinstance(key, slice) and key.step in (None, 1) and self.shape:
            start, stop, _ = key.indices(self.shape[0])
            stop = max(start, stop)
            row = self.nbytes // self.shape[0] if self.shape[0] else 0
            shape = (stop - start, *self.shape[1:])
            return DeviceView(self.ptr + start * row, shape, self.dtype, self.device_id, self.owner)
        return self.cupy()[key]

    def reshape(self, *shape: Any) -> DeviceView:
        """The same bytes in ``shape`` (one dimension may be -1)."""
        dims = list(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        known = 1
        for d in dims:
            if d != -1:
                known *= d
        if -1 in dims:
            if dims.count(-1) > 1 or known == 0 or self.size % known:
                raise ValueError(f"cannot reshape a device view of shape {self.shape} into {tuple(dims)}")
            dims[dims.index(-1)] = self.size // known
        elif known != self.size:
            raise ValueError(f"cannot reshape a device view of shape {self.shape} into {tuple(dims)}")
        return DeviceView(self.ptr, tuple(int(d) for d in dims), self.dtype, self.device_id, self.owner)

    def cupy(self) -> Any:
        """A CuPy array over the same memory (no copy; it keeps this view alive)."""
        import cupy

        if not self.nbytes:
            with cupy.cuda.Device(self.device_id):
                return cupy.empty(self.shape, dtype=self.dtype)
        mem = cupy.cuda.UnownedMemory(self.ptr, self.nbytes, self, device_id=self.device_id)
        return cupy.ndarray(self.shape, dtype=self.dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))

    def get(self) -> np.ndarray[Any, Any]:
        """The data copied to host memory."""
        return self.cupy().get()  # type: ignore[no-any-return]

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None}  # fmt: skip

    def __repr__(self) -> str:
        return f"DeviceView(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype}, device={self.device_id})"


def address(array: Any) -> int:
    """The device address of a CuPy array or a view."""
    return array.ptr if array.__class__ is DeviceView else array.data.ptr


def device_of(array: Any) -> int:
    """The GPU of a CuPy array or a view."""
    return array.device_id if array.__class__ is DeviceView else array.device.id


def as_cupy(array: Any) -> Any:
    """A CuPy array for a view (no copy); anything else as it is."""
    return array.cupy() if array.__class__ is DeviceView else array
