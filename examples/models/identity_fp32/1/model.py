"""identity_fp32: OUTPUT0 = INPUT0 (used by the benchmarks)."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Returns its input unchanged."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request."""
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", _input(r, "INPUT0"))])
            for r in requests
        ]


def _input(request: Any, name: str) -> Any:
    """The named input of a request as a numpy array."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise pb_utils.TritonModelException(f"request has no input '{name}'")
    return tensor.as_numpy()
