"""``workers.devview.DeviceView``: the address arithmetic of the views the PyTorch backend's
GPU path passes instead of CuPy arrays (no GPU needed: nothing here touches the memory; the
copies through them run in ``tests/gpu``)."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.workers.devview import DeviceView, address, as_cupy, device_of
from shoal.workers.tensors import is_device_array

F32 = np.dtype(np.float32)


def test_rows_of_a_view_are_offsets_of_its_address() -> None:
    owner = object()
    v = DeviceView(0x1000, (8, 3, 2), F32, 1, owner)
    assert (v.nbytes, v.ndim, v.size, len(v)) == (8 * 6 * 4, 3, 48, 8)
    part = v[2:5]
    assert (part.ptr, part.shape, part.nbytes, part.device_id) == (0x1000 + 2 * 24, (3, 3, 2), 72, 1)
    assert part.owner is owner
    assert v[6:100].shape == (2, 3, 2)  # clipped as a slice of a list is
    assert v[5:2].shape == (0, 3, 2) and v[5:2].nbytes == 0
    assert v[-2:].ptr == 0x1000 + 6 * 24
    assert address(part) == part.ptr and device_of(part) == 1
    assert as_cupy(np.zeros(2)) is not None


def test_reshape_keeps_the_bytes_and_refuses_what_does_not_fit() -> None:
    v = DeviceView(0x2000, (4, 6), F32, 0, None)
    assert v.reshape(4, 2, 3).shape == (4, 2, 3)
    assert v.reshape([-1, 3]).shape == (8, 3)
    assert v.reshape((24,)).ptr == 0x2000
    for bad in ((5, 5), (-1, 5), (-1, -1)):
        with pytest.raises(ValueError, match="cannot reshape"):
            v.reshape(*bad)


def test_a_view_is_a_device_array_with_the_cuda_array_interface() -> None:
    v = DeviceView(0x3000, (2, 2), np.dtype(np.int64), 0, None)
    assert is_device_array(v) and not is_device_array(np.zeros(2))
    cai = v.__cuda_array_interface__
    assert cai["shape"] == (2, 2) and cai["typestr"] == "<i8" and cai["data"] == (0x3000, False)
    assert v.flags.c_contiguous
    with pytest.raises(TypeError):
        len(DeviceView(0, (), F32, 0, None))
