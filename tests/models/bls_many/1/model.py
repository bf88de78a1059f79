"""bls_many: COUNT calls of identity_fp32 with INPUT0, one after another, in one execute."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            for i in range(count):
                call = pb_utils.InferenceRequest(
                    model_name="identity_fp32", requested_output_names=["OUTPUT0"], inputs=[x]
                )
                answer = call.exec()
                if answer.has_error():
                    raise pb_utils.TritonModelException(f"call {i}: {answer.error().message()}")
                out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
                if not np.array_equal(out, x.as_numpy()):
                    raise pb_utils.TritonModelException(f"call {i} answered {out!r}")
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x.as_numpy())]))
        return responses
