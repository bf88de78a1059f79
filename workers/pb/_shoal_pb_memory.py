"""pb_utils' memory kinds: the ``TRITONSERVER_MEMORY_*`` constants, ``MemoryType`` and
``PreferredMemory`` (where a BLS call would like its outputs)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

TRITONSERVER_MEMORY_CPU: Final = 0
TRITONSERVER_MEMORY_CPU_PINNED: Final = 1
TRITONSERVER_MEMORY_GPU: Final = 2


class MemoryType(IntEnum):
    """The memory kinds ``PreferredMemory`` names (also module-level constants)."""

    TRITONSERVER_MEMORY_CPU = TRITONSERVER_MEMORY_CPU
    TRITONSERVER_MEMORY_GPU = TRITONSERVER_MEMORY_GPU


class PreferredMemory:
    """Where a BLS call would like its outputs (``InferenceRequest(preferred_memory=...)``).
    ``TRITONSERVER_MEMORY_GPU``: outputs a GPU model returns in GPU memory come back there when
    the calling instance runs on a GPU; otherwise, and by default, Shoal returns BLS outputs
    in host memory."""

    def __init__(self, preferred_memory_type: int = TRITONSERVER_MEMORY_CPU, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = int(preferred_memory_type)
        self.preferred_device_id = int(preferred_device_id)
