"""placed: see config.pbtxt."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236}


def _mempolicy() -> list[int]:
    number = _GET_MEMPOLICY.get(platform.machine())
    if number is None:
        return [-1, -1]
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * 16)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, ctypes.byref(mode), mask, ctypes.c_ulong(16 * 64), None, ctypes.c_ulong(0)) != 0:
        return [-2, ctypes.get_errno()]
    return [mode.value, mask[0]]


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.extend(sorted(os.sched_getaffinity(0))))
        t.start()
        t.join()
        out = []
        for _ in requests:
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("CPUS", np.array(seen, dtype=np.int32)),
                pb_utils.Tensor("MEMPOLICY", np.array(_mempolicy(), dtype=np.int64)),
            ]))  # fmt: skip
        return out
