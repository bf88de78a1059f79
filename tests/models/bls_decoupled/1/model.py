"""bls_decoupled: iterates a decoupled model's responses (exec(decoupled=True)); with the
request parameter "cancel_after" it cancels the call (ResponseIterator.cancel) after that
many responses."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            call = pb_utils.InferenceRequest(
                model_name="repeat",
                requested_output_names=["OUT"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "IN")],
                parameters=request.parameters(),
            )
            total = count = 0
            error = None
            cancel_after = json.loads(request.parameters()).get("cancel_after", 0)
            answers = call.exec(decoupled=True)
            for answer in answers:
                if answer.has_error():
                    error = answer.error()
                    break
                out = pb_utils.get_output_tensor_by_name(answer, "OUT")
                if out is None:  # the empty last response: the end of the stream
                    continue
                total += int(out.as_numpy()[0])
                count += 1
                if count == cancel_after:
                    answers.cancel()
                    break
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message())))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("SUM", np.array([total], dtype=np.int64)),
                        pb_utils.Tensor("COUNT", np.array([count], dtype=np.int64)),
                    ]
                )
            )
        return responses
