"""Tensors and datatypes of ``triton_python_backend_utils`` (re-exported by that module):
``Tensor`` over a numpy array, DLPack exchange (CPU only), the datatype tables and the BYTES
(length-prefixed) serialization helpers."""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

_BYTES_CODE: Final = 13
_BF16_CODE: Final = 14

TRITON_STRING_TO_NUMPY: Final[dict[str, type[Any]]] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType numbers (equal to the config's DataType numbers) -> numpy type.
_CODE_TO_NUMPY: Final[dict[int, type[Any]]] = {i + 1: t for i, t in enumerate(TRITON_STRING_TO_NUMPY.values())}
_DTYPE_TO_CODE: Final[dict[np.dtype[Any], int]] = {
    np.dtype(t): c for c, t in _CODE_TO_NUMPY.items() if c != _BYTES_CODE
}


def triton_string_to_numpy(triton_type_string: str) -> type[Any]:
    """The numpy type of a config datatype name, e.g. ``"TYPE_FP32"`` -> ``np.float32``."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type[Any] | None:
    """The numpy type of a ``TRITONSERVER_DataType`` number, or None if it has none."""
    return _CODE_TO_NUMPY.get(int(data_type))


def numpy_to_triton_type(data_type: Any) -> int | None:
    """The ``TRITONSERVER_DataType`` number of a numpy type or dtype, or None."""
    try:
        return _DTYPE_TO_CODE[data_type]  # most calls: a dtype of the table
    except (KeyError, TypeError):
        pass
    try:
        dt = np.dtype(data_type)
    except TypeError:
        return None
    if dt.kind in ("O", "S"):
        return _BYTES_CODE
    if dt.name == "bfloat16":
        return _BF16_CODE
    return _DTYPE_TO_CODE.get(dt)


def serialize_byte_tensor(input_tensor: Array) -> bytes | None:
    """Length-prefix (4-byte little-endian) every element of a BYTES array, in C order."""
    if input_tensor.size == 0:
        return b""
    if input_tensor.dtype.kind not in ("O", "S"):
        return None
    parts: list[bytes] = []
    for item in input_tensor.reshape(-1, order="C").tolist():
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: bytes | memoryview) -> npt.NDArray[np.object_]:
    """Split a length-prefixed buffer into a 1-D object array of ``bytes``."""
    view = memoryview(encoded_tensor).cast("B")
    items: list[bytes] = []
    pos = 0
    while pos < len(view):
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        items.append(bytes(view[pos : pos + n]))
        pos += n
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


class TritonModelException(Exception):
    """The exception the utilities raise (and models may raise) on misuse or failure."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._msg = msg

    def __str__(self) -> str:
        return self._msg

    def message(self) -> str:
        """The exception message."""
        return self._msg


class _Capsule:
    """Adapts a bare DLPack capsule to the ``__dlpack__`` protocol numpy consumes."""

    def __init__(self, capsule: object, device: tuple[int, int]) -> None:
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, **_: Any) -> object:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


_KDL_CPU: Final = 1
_KDL_CUDA: Final = 2
_KDL_CUDA_HOST: Final = 3


def _is_device_array(obj: object) -> bool:
    """A CuPy array (GPU memory); CuPy is imported only by code that made one."""
    return type(obj).__module__.split(".", 1)[0] == "cupy"


def _capsule_device(capsule: object) -> tuple[int, int]:
    """Read ``dl_tensor.device`` out of an unversioned or versioned DLPack capsule."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    name = api.PyCapsule_GetName(capsule)
    if name == b"dltensor":
        offset = ctypes.sizeof(ctypes.c_void_p)  # DLTensor{void* data; DLDevice device; ...}
    elif name == b"dltensor_versioned":
        # {DLPackVersion(2 x u32); void* ctx; void* deleter; u64 flags; DLTensor dl_tensor}
        offset = 8 + 2 * ctypes.sizeof(ctypes.c_void_p) + 8 + ctypes.sizeof(ctypes.c_void_p)
    else:
        raise TritonModelException(f"not an unconsumed DLPack capsule (name {name!r})")
    ptr = api.PyCapsule_GetPointer(capsule, name)
    dev = (ctypes.c_int32 * 2).from_address(ptr + offset)
    return int(dev[0]), int(dev[1])


class Tensor:
    """A named tensor of an inference request or response: a numpy array (CPU), or a CuPy
    array (GPU) for models that set ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"`` or build outputs
    with ``from_dlpack`` from GPU memory."""

    __slots__ = ("_name", "_array", "_dtype")

    def __init__(self, name: str, numpy_array: Array, triton_dtype: int | None = None) -> None:
        if not isinstance(numpy_array, np.ndarray) and not _is_device_array(numpy_array):
            raise TritonModelException(f"tensor '{name}': expected a numpy array, got {type(numpy_array).__name__}")
        if numpy_array.dtype.kind in ("U", "V"):
            raise TritonModelException(
                f"tensor '{name}': numpy dtype {numpy_array.dtype} is not supported; use np.object_ for strings"
            )
        if triton_dtype is not None:
            want = triton_to_numpy_type(triton_dtype)
            if want is None:
                raise TritonModelException(f"tensor '{name}': unknown Triton datatype {triton_dtype}")
            if want is not np.object_ and numpy_array.dtype != want:
                numpy_array = numpy_array.view(want)
            code = int(triton_dtype)
        else:
            found = numpy_to_triton_type(numpy_array.dtype)
            if found is None:
                raise TritonModelException(f"tensor '{name}': unsupported numpy dtype {numpy_array.dtype}")
            code = found
        self._name = name
        self._array = numpy_array
        self._dtype = code

    @classmethod
    def _wrap(cls, name: str, array: Array, code: int) -> Tensor:
        """Build without checks (the backend's fast path for request inputs)."""
        t = cls.__new__(cls)
        t._name, t._array, t._dtype = name, array, code
        return t

    def name(self) -> str:
        """The tensor's name."""
        return self._name

    def as_numpy(self) -> Array:
        """The tensor's data; BYTES tensors are object arrays of ``bytes``."""
        if not isinstance(self._array, np.ndarray):
            raise TritonModelException(
                f"tensor '{self._name}' is stored in GPU memory and cannot be converted to NumPy; "
                'use to_dlpack() (or set FORCE_CPU_ONLY_INPUT_TENSORS to "yes")'
            )
        return self._array

    def triton_dtype(self) -> int:
        """The ``TRITONSERVER_DataType`` number of the tensor."""
        return self._dtype

    def shape(self) -> list[int]:
        """The tensor's shape."""
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        """False for tensors in GPU memory."""
        return isinstance(self._array, np.ndarray)

    def to_dlpack(self) -> object:
        """A DLPack capsule sharing the tensor's memory (not for BYTES tensors)."""
        if self._array.dtype.kind in ("O", "S"):
            raise TritonModelException(f"tensor '{self._name}': BYTES tensors cannot be exported to DLPack")
        return self._array.__dlpack__()

    def __dlpack__(self, **kwargs: Any) -> object:
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        if isinstance(self._array, np.ndarray):
            return (_KDL_CPU, 0)
        return (_KDL_CUDA, int(self._array.device.id))

    @staticmethod
    def from_dlpack(name: str, dlpack_tensor: object) -> Tensor:
        """A tensor over a DLPack capsule or an object with ``__dlpack__``, in CPU or GPU
        memory (GPU tensors are wrapped with CuPy, no copy)."""
        source: Any
        if hasattr(dlpack_tensor, "__dlpack__"):
            source = dlpack_tensor
            device = (int(source.__dlpack_device__()[0]), int(source.__dlpack_device__()[1]))
        else:
            device = _capsule_device(dlpack_tensor)
            source = _Capsule(dlpack_tensor, device)
        if device[0] == _KDL_CUDA:
            try:
                import cupy
            except ImportError:
                raise TritonModelException(
                    f"tensor '{name}': GPU tensors need CuPy in the model's environment"
                ) from None
            return Tensor(name, cupy.from_dlpack(source))
        if device[0] not in (_KDL_CPU, _KDL_CUDA_HOST):
            raise TritonModelException(
                f"tensor '{name}': DLPack device type {device[0]} is not supported (CPU and CUDA are)"
            )
        return Tensor(name, np.from_dlpack(source))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, dtype={self._array.dtype}, shape={self._array.shape})"
