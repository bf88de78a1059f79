"""bls_many: COUNT calls of identity_fp32 with INPUT0, one after another, in one execute;
TIMES: the mean microseconds per call of building it, of ``exec()`` and of reading its output."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            spent = np.zeros(3)
            clock = time.perf_counter
            for i in range(count):
                t0 = clock()
                call = pb_utils.InferenceRequest(
                    model_name="identity_fp32", requested_output_names=["OUTPUT0"], inputs=[x]
                )
                t1 = clock()
                answer = call.exec()
                t2 = clock()
                if answer.has_error():
                    raise pb_utils.TritonModelException(f"call {i}: {answer.error().message()}")
                out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
                spent += (t1 - t0, t2 - t1, clock() - t2)
                if not np.array_equal(out, x.as_numpy()):
                    raise pb_utils.TritonModelException(f"call {i} answered {out!r}")
            times = pb_utils.Tensor("TIMES", spent / max(count, 1) * 1e6)
            echo = pb_utils.Tensor("OUTPUT0", x.as_numpy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[echo, times]))
        return responses
