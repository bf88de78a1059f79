"""add_sub: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton Python-backend API)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sum and difference of two tensors."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the output datatypes from the model configuration."""
        config = json.loads(args["model_config"])
        self.out0_dtype = _output_dtype(config, "OUTPUT0")
        self.out1_dtype = _output_dtype(config, "OUTPUT1")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, with both outputs."""
        responses = []
        for request in requests:
            in0 = _input(request, "INPUT0")
            in1 = _input(request, "INPUT1")
            out0 = pb_utils.Tensor("OUTPUT0", np.add(in0, in1).astype(self.out0_dtype))
            out1 = pb_utils.Tensor("OUTPUT1", np.subtract(in0, in1).astype(self.out1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
        return responses

    def finalize(self) -> None:
        """Nothing to release."""


def _input(request: Any, name: str) -> Any:
    """The named input of a request as a numpy array."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise pb_utils.TritonModelException(f"request has no input '{name}'")
    return tensor.as_numpy()


def _output_dtype(config: dict[str, Any], name: str) -> Any:
    """The numpy type of a configured output."""
    output = pb_utils.get_output_config_by_name(config, name)
    if output is None:
        raise pb_utils.TritonModelException(f"model configuration has no output '{name}'")
    return pb_utils.triton_string_to_numpy(output["data_type"])
