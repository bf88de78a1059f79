"""``--model-load-gpu-limit``: as Triton does, a GPU instance whose load leaves more than the
limit's fraction of its GPU's memory in use (every process's, as ``cudaMemGetInfo`` counts it)
fails to load; checked once its backend has loaded, so that the instance which crosses the
limit is the one refused."""

from __future__ import annotations

from collections.abc import Callable

from shoal.proto.errors import ErrorCode, ServingError


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of device 0: the instance's GPU (its worker's ``CUDA_VISIBLE_DEVICES``
    puts it first), through CuPy, else PyTorch."""
    try:
        import cupy
    except ImportError:
        import torch

        free, total = torch.cuda.mem_get_info(0)
        return int(free), int(total)
    with cupy.cuda.Device(0):
        free, total = cupy.cuda.runtime.memGetInfo()
    return int(free), int(total)


def check_load_limit(
    instance: str, server_gpu: int, fraction: float, info: Callable[[], tuple[int, int]] = memory_info
) -> None:
    """Raise Triton's error when more than ``fraction`` of the GPU's memory is in use."""
    free, total = info()
    if total - free > int(total * fraction):
        raise ServingError(
            f"can not create model '{instance}': memory limit set for GPU {server_gpu} has exceeded, "
            "model loading is rejected.",
            code=ErrorCode.UNAVAILABLE,
        )
