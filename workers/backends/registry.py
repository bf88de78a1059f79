"""Backend name -> Backend class. Explicit; heavy modules are imported on first use."""

from __future__ import annotations

import importlib

from shoal.proto.errors import ErrorCode, ServingError
from shoal.workers.backends.base import Backend

_BACKENDS: dict[str, str] = {
    "python": "shoal.workers.backends.python:PythonBackend",
    "onnxruntime": "shoal.workers.backends.onnxruntime:OnnxRuntimeBackend",
    "pytorch": "shoal.workers.backends.pytorch:PyTorchBackend",
    "tensorrt": "shoal.workers.backends.tensorrt:TensorRTBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class for a config's ``backend``; raises ``UNIMPLEMENTED`` for unknown names."""
    target = _BACKENDS.get(name)
    if target is None:
        raise ServingError(f"backend '{name}' is not supported", code=ErrorCode.UNIMPLEMENTED)
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ServingError(f"backend '{name}' is not available: {exc}", code=ErrorCode.UNIMPLEMENTED) from None
    cls: type[Backend] = getattr(module, cls_name)
    return cls
