"""A worker applies its instance's host policy (``proto.hostpolicy``) to itself before its
backend loads: ``cpu-cores`` is the CPU affinity of every thread of the process (threads
started later inherit it), ``numa-node`` binds the memory allocated from then on by the
loading thread and every thread it starts (the backend's) to that node
(``set_mempolicy(MPOL_BIND)``; the heartbeat thread, started before, keeps the default).
Triton applies the same settings to the instance's threads; a worker process is the
instance here. Failures fail the load with Triton's texts."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

from shoal.proto import hostpolicy
from shoal.proto.errors import ErrorCode, ServingError

log = logging.getLogger("shoal.worker")

MPOL_BIND = 2
_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}
"""The ``set_mempolicy`` system call's number (no libnuma needed)."""


def apply(settings: Mapping[str, str], name: str = "") -> None:
    """Apply host policy ``name``'s ``settings`` to this process."""
    if not settings:
        return
    try:
        cores = hostpolicy.cpu_cores(settings["cpu-cores"]) if "cpu-cores" in settings else None
        node = hostpolicy.numa_node(settings["numa-node"]) if "numa-node" in settings else None
    except ValueError as exc:
        raise ServingError(str(exc), code=ErrorCode.INVALID_ARGUMENT) from None
    if cores is not None:
        log.info("host policy '%s': binding to one of the CPUs %s", name, cores)
        try:
            for task in os.listdir("/proc/self/task"):  # each thread has its own affinity
                try:
                    os.sched_setaffinity(int(task), cores)
                except ProcessLookupError:
                    pass  # the thread ended meanwhile
        except (OSError, ValueError) as exc:
            raise ServingError(f"Unable to set NUMA thread affinity: {_why(exc)}", code=ErrorCode.INTERNAL) from None
    if node is not None:
        log.info("host policy '%s': binding memory to NUMA node %d", name, node)
        _bind_memory(node)


def _why(exc: BaseException) -> str:
    return os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)


def _bind_memory(node: int) -> None:
    number = _SET_MEMPOLICY.get(platform.machine())
    if number is None:
        raise ServingError(f"Unable to set NUMA memory policy: not supported on {platform.machine()}",
                           code=ErrorCode.INTERNAL)  # fmt: skip
    if not 0 <= node < 64 * 16:
        raise ServingError(f"Unable to set NUMA memory policy: {os.strerror(22)}", code=ErrorCode.INTERNAL)
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, MPOL_BIND, mask, ctypes.c_ulong(words * 64 + 1)) != 0:
        err = ctypes.get_errno()
        raise ServingError(f"Unable to set NUMA memory policy: {os.strerror(err)}", code=ErrorCode.INTERNAL)
