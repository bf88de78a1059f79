"""The one datatype table: KServe protocol string <-> config ``DataType`` <-> numpy.

Tensor bytes everywhere in Shoal (HTTP binary bodies, shared memory, worker message frames) are
little-endian, row-major, unpadded. BOOL is one byte (0/1). BYTES tensors are serialized as,
for every element in row-major order, a 4-byte little-endian unsigned length followed by the
element's bytes (Triton's encoding); their byte size therefore depends on the contents.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from shoal.proto.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class DType:
    """One datatype: protocol string, config enum name and number, numpy dtype, size."""

    protocol: str
    config_name: str
    config_number: int
    numpy: np.dtype[np.generic] | None
    """numpy dtype of the element; ``object`` for BYTES, ``None`` where numpy has none (BF16)."""
    itemsize: int
    """bytes per element; 0 for BYTES (variable)."""


def _bf16_numpy() -> np.dtype[np.generic] | None:
    try:
        import ml_dtypes

        bf16: np.dtype[np.generic] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    except ImportError:
        return None


_TABLE: Final = (
    DType("BOOL", "TYPE_BOOL", 1, np.dtype(np.bool_), 1),
    DType("UINT8", "TYPE_UINT8", 2, np.dtype("<u1"), 1),
    DType("UINT16", "TYPE_UINT16", 3, np.dtype("<u2"), 2),
    DType("UINT32", "TYPE_UINT32", 4, np.dtype("<u4"), 4),
    DType("UINT64", "TYPE_UINT64", 5, np.dtype("<u8"), 8),
    DType("INT8", "TYPE_INT8", 6, np.dtype("<i1"), 1),
    DType("INT16", "TYPE_INT16", 7, np.dtype("<i2"), 2),
    DType("INT32", "TYPE_INT32", 8, np.dtype("<i4"), 4),
    DType("INT64", "TYPE_INT64", 9, np.dtype("<i8"), 8),
    DType("FP16", "TYPE_FP16", 10, np.dtype("<f2"), 2),
    DType("FP32", "TYPE_FP32", 11, np.dtype("<f4"), 4),
    DType("FP64", "TYPE_FP64", 12, np.dtype("<f8"), 8),
    DType("BYTES", "TYPE_STRING", 13, np.dtype(np.object_), 0),
    DType("BF16", "TYPE_BF16", 14, _bf16_numpy(), 2),
)

BY_PROTOCOL: Final[dict[str, DType]] = {d.protocol: d for d in _TABLE}
BY_CONFIG_NUMBER: Final[dict[int, DType]] = {d.config_number: d for d in _TABLE}
BY_CONFIG_NAME: Final[dict[str, DType]] = {d.config_name: d for d in _TABLE}


def by_protocol(name: str) -> DType:
    """The datatype for a protocol string such as ``"FP32"``; raises ``InvalidInput``."""
    try:
        return BY_PROTOCOL[name]
    except KeyError:
        raise InvalidInput(f"invalid datatype '{name}'") from None


_BY_NUMPY: Final[dict[object, DType]] = {}
"""``from_numpy`` answers by dtype (and type), filled as dtypes are seen."""


def from_numpy(dtype: npt.DTypeLike) -> DType:
    """The datatype of a numpy dtype; bytes, str and object arrays are BYTES."""
    try:
        return _BY_NUMPY[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like
        pass
    found = _from_numpy(dtype)
    if len(_BY_NUMPY) < 256:
        try:
            _BY_NUMPY[dtype] = found
        except TypeError:
            pass
    return found


def _from_numpy(dtype: npt.DTypeLike) -> DType:
    dt = np.dtype(dtype)
    if dt.kind in ("O", "S", "U"):
        return BY_PROTOCOL["BYTES"]
    if dt.name == "bfloat16":
        return BY_PROTOCOL["BF16"]
    for d in _TABLE:
        if d.numpy is not None and d.numpy.kind != "O" and d.numpy == dt.newbyteorder("<"):
            return d
    raise InvalidInput(f"unsupported numpy dtype '{dt}'")


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_LEN = struct.Struct("<I")


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Length-prefix every element of a BYTES array (``str`` elements are UTF-8 encoded)."""
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist() if array.size else []:
        b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | bytearray | memoryview, count: int, *, name: str = "") -> npt.NDArray[np.object_]:
    """Split a length-prefixed buffer into ``count`` ``bytes`` objects.

    Raises ``InvalidInput`` (naming ``name``) when the buffer does not hold exactly ``count``
    well-formed elements.
    """
    view = memoryview(buffer).cast("B")
    end = len(view)
    if count < 0:
        raise InvalidInput(f"BYTES tensor '{name}' has a negative element count")
    if count > end // 4:
        # every element needs its 4-byte length: refuse before allocating ``count`` slots
        # (a shape of [200000000] with no data must not cost 1.6 GB)
        raise InvalidInput(
            f"expected {count} string elements for BYTES tensor '{name}', but its {end} bytes hold at most {end // 4}"
        )
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(f"expected {count} string elements for BYTES tensor '{name}', got {i}")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"BYTES tensor '{name}': element {i} runs past the end of its data")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != end:
        raise InvalidInput(f"BYTES tensor '{name}' has {end - pos} bytes after its {count} elements")
    return out


def byte_size(dtype: DType, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a fixed-size tensor (not BYTES)."""
    return element_count(shape) * dtype.itemsize
