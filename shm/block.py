"""``Block``: a value naming bytes in a shared-memory region; safe to put on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HOST: Final = -1
"""``device`` of host (POSIX shm) memory; CUDA blocks carry the ordinal."""


@dataclass(frozen=True, slots=True)
class Block:
    """``nbytes`` bytes at ``offset`` of region ``region``. Never a pointer."""

    region: str
    offset: int
    nbytes: int
    device: int = HOST
