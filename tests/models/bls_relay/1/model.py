"""bls_relay: INPUT0 to the model MODEL_NAME names by BLS, its OUTPUT0 back; the target's error
becomes this request's error, with its text and code."""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            name = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0].decode()
            params = json.loads(request.parameters() or "{}")
            outputs = str(params.pop("bls_outputs", "OUTPUT0")).split(",")
            timeout = int(params.pop("bls_timeout_us", 0))
            call = pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=outputs,
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0")],
                timeout=timeout,
                parameters=params,
            )
            answer = call.exec()
            if answer.has_error():
                err = answer.error()
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message(), err.code())))
                continue
            out = pb_utils.get_output_tensor_by_name(answer, outputs[0]).as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses
