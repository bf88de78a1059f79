"""strings: uppercases every BYTES element of INPUT0 (OUTPUT0) and gives its length (OUTPUT1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Uppercase and length of each string element."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; shapes follow INPUT0 (batch dimension included)."""
        responses = []
        for request in requests:
            data = _input(request, "INPUT0")
            upper = np.empty(data.shape, dtype=np.object_)
            lengths = np.empty(data.shape, dtype=np.int32)
            for index, item in np.ndenumerate(data):
                value = item if isinstance(item, bytes) else str(item).encode("utf-8")
                upper[index] = value.upper()
                lengths[index] = len(value)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT0", upper), pb_utils.Tensor("OUTPUT1", lengths)]
                )
            )
        return responses


def _input(request: Any, name: str) -> Any:
    """The named input of a request as a numpy array."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise pb_utils.TritonModelException(f"request has no input '{name}'")
    return tensor.as_numpy()
