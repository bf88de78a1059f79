"""Hypothesis strategies for the decoder fuzzers: single values (datatypes, dimensions, names,
JSON, parameters, header lengths, model versions) and the helpers that turn tensor elements
into the forms clients send. Requests built from them are in ``fuzz_requests``."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st

from shoal.proto import dtypes
from tests.security.fuzzing import MODELS

# ---- datatypes, dimensions, names, JSON, parameters --------------------------------------------

PROTOCOLS = tuple(dtypes.BY_PROTOCOL)
F32_MAX = float(np.finfo(np.float32).max)
INVALID_DATATYPES = ("", "fp32", "FLOAT", "STRING", "TYPE_FP32", "INT128", "FP8", "BYTES ", "BOOL\x00", "İNT8")
DATATYPES = st.one_of(st.sampled_from(PROTOCOLS), st.sampled_from(INVALID_DATATYPES), st.text(max_size=6))
HUGE = (2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70)
NEGATIVE = (-1, -2, -(2**31), -(2**63), -(2**63) - 1)
DIMS = st.one_of(st.integers(0, 4), st.sampled_from(HUGE + NEGATIVE), st.integers(-(2**65), 2**65))
I64 = st.one_of(st.integers(0, 4), st.sampled_from((*HUGE[:7], *NEGATIVE[:4])), st.integers(-(2**63), 2**63 - 1))
NAMES = st.one_of(
    st.sampled_from(sorted({n for mv in MODELS.values() for n in mv.inputs}) + ["", "Z", "a" * 300, "A\x00", "ä"]),
    st.text(max_size=4),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=24,
)
SIZES = st.one_of(st.integers(0, 80), st.sampled_from(HUGE + NEGATIVE), st.booleans(), JSON_SCALARS)
REGIONS = st.one_of(st.sampled_from(["r0", "region", "", "/etc/passwd", "shoal_x", "a" * 300]), JSON_SCALARS)
PARAM_KEYS = (
    "binary_data_size",
    "binary_data",
    "binary_data_output",
    "classification",
    "shared_memory_region",
    "shared_memory_offset",
    "shared_memory_byte_size",
    "sequence_id",
    "sequence_start",
    "priority",
    "timeout",
    "triton_enable_empty_final_response",
    "triton_reserved",
    "custom",
)
PARAMS = st.dictionaries(
    st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=4)),
    st.one_of(SIZES, REGIONS, JSON_SCALARS),
    max_size=4,
)
"""Parameters of any of the kinds the decoders read, with values of any kind."""


# ---- tensor elements and their binary forms ----------------------------------------------------


def item_size(datatype: str) -> int:
    """Bytes per element of ``datatype`` (1 for BYTES and unknown datatypes)."""
    dt = dtypes.BY_PROTOCOL.get(datatype)
    return 1 if dt is None or dt.itemsize == 0 else dt.itemsize


def element_values(datatype: str) -> st.SearchStrategy[Any]:
    """Values a client would send for ``datatype``, in range."""
    dt = dtypes.BY_PROTOCOL.get(datatype)
    if dt is None:
        return st.integers(-3, 3)
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=6)
    if dt.numpy is not None and dt.numpy.kind in "iu":
        info = np.iinfo(dt.numpy)  # type: ignore[type-var]  # integer kinds only here
        return st.integers(int(info.min), int(info.max))
    if datatype in ("FP16", "BF16"):
        return st.floats(-65504.0, 65504.0, width=16)
    if datatype == "FP32":
        return st.floats(-F32_MAX, F32_MAX, width=32)
    return st.floats(allow_nan=False, allow_infinity=False)


def binary_form(datatype: str, values: list[Any]) -> bytes:
    """The binary form of ``values`` (what tritonclient sends)."""
    if datatype == "BYTES":
        return dtypes.serialize_bytes(np.array(values, dtype=np.object_))
    if datatype == "BF16":
        return np.array(values, dtype="<f4").view("<u2")[1::2].tobytes()
    dt = dtypes.BY_PROTOCOL.get(datatype)
    if dt is None or dt.numpy is None:
        return bytes(len(values))
    return np.array(values, dtype=dt.numpy).tobytes()


def nested(values: list[Any], shape: list[int]) -> list[Any]:
    """``values`` nested as ``shape`` (row-major); flat when they do not fit it."""
    if len(shape) <= 1 or dtypes.element_count(shape) != len(values) or any(d < 0 or d > 64 for d in shape):
        return list(values)
    step = dtypes.element_count(shape[1:])
    return [nested(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def length_prefixed(items: list[bytes]) -> bytes:
    """Triton's BYTES serialization: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# ---- integer-like strings and counts -----------------------------------------------------------

DIGIT_STRINGS = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=12),
    # around the 4300-digit limit of int() on strings (sys.get_int_max_str_digits())
    st.integers(4290, 4310).map(lambda n: "1" * n),
)
INTEGER_LIKE = st.builds(
    lambda pad, sign, digits: pad + sign + digits + pad,
    st.sampled_from(["", " ", "\t", "\u2003"]),
    st.sampled_from(["", "-", "--", "+", "-+", "+-", "0x", "- "]),
    DIGIT_STRINGS,
)
"""Strings that look like integers to a quick check: signs, padding, very many digits."""
UNICODE_DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3)
"""Digits that are not ASCII: ``str.isdigit()`` is true for all, ``int()`` takes only ``Nd``."""
HEADER_VALUES = st.one_of(
    st.none(),
    INTEGER_LIKE,
    st.text(alphabet="-+0123456789 \t_x", max_size=8),
    st.integers(-(2**70), 2**70).map(str),
    UNICODE_DIGITS,
    st.text(max_size=6),
)
"""Values of the ``Inference-Header-Content-Length`` header (``None``: absent)."""
VERSIONS = st.one_of(
    st.sampled_from(["", "", "1", "0", "-1", "01", "١٢", " 1", "1.0", "x", "18446744073709551616"]),
    INTEGER_LIKE,
    UNICODE_DIGITS,
    st.text(max_size=6),
)
"""``model_version`` strings of gRPC requests."""
BYTES_COUNTS = st.one_of(st.integers(0, 8), st.sampled_from(HUGE[:-2]), st.integers(0, 2**40))
"""Element counts for ``deserialize_bytes``: small, huge, or anything up to 2**40."""
