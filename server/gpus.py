"""The GPUs this server may place instances on, read without any CUDA library (the router
imports none): the NVIDIA driver's /proc (or /dev) entries, limited and ordered by the
server's own ``CUDA_VISIBLE_DEVICES``. Server GPU ``i`` is ``devices()[i]``."""

from __future__ import annotations

import os
import re


def _driver_count() -> int:
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    try:
        return sum(1 for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n))
    except OSError:
        return 0


def devices() -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` entries of the server's GPUs (ordinals or UUIDs), in order."""
    count = _driver_count()
    if count == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    out: list[str] = []
    for entry in (v.strip() for v in visible.split(",")):
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry
        out.append(entry)
    return out[:count]


def count() -> int:
    return len(devices())


def worker_order(gpu: int, devs: list[str]) -> list[int]:
    """Server GPU ordinals in the order a worker on ``gpu`` sees them: its own GPU first
    (the worker's device 0), the others after, so it can still read CUDA shared memory
    that clients placed on another GPU."""
    return [gpu] + [i for i in range(len(devs)) if i != gpu]


def visible_env(gpu: int, devs: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker on server GPU ``gpu``."""
    return ",".join(devs[i] for i in worker_order(gpu, devs))
