"""bls_reshape: X as a [1, 2, n/2] request to reshaper by BLS (see config.pbtxt)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            call = pb_utils.InferenceRequest(
                model_name="reshaper",
                requested_output_names=["OUTPUT0", "SEEN_RANK"],
                inputs=[pb_utils.Tensor("INPUT0", x.reshape(1, 2, -1))],
            )
            answer = call.exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
            rank = pb_utils.get_output_tensor_by_name(answer, "SEEN_RANK").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT0", out.ravel()),
                        pb_utils.Tensor("SEEN_RANK", rank.reshape(1).astype(np.int32)),
                        pb_utils.Tensor("SHAPE", np.array(out.shape, dtype=np.int64)),
                    ]
                )
            )
        return responses
