"""bls_timed: one BLS call per request, with the timeout the request's parameters give."""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            params = json.loads(request.parameters() or "{}")
            call = pb_utils.InferenceRequest(
                model_name=params.get("target", "latecheck"),
                requested_output_names=["OUTPUT0"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0")],
                parameters={"delay_ms": int(params.get("delay_ms", 0))},
                timeout=int(params.get("timeout_us", 0)),
            )
            answer = call.exec()
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(answer.error().message())))
                continue
            out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses
