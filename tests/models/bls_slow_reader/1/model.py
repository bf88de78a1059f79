"""bls_slow_reader: see config.pbtxt."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            params = json.loads(request.parameters() or "{}")
            pause_s = params.get("pause_ms", 500) / 1000
            stop_after = params.get("stop_after", 0)
            call = pb_utils.InferenceRequest(
                model_name="stamps",
                requested_output_names=["STAMP"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "IN")],
            )
            stamps = []
            woke = 0
            for answer in call.exec(decoupled=True):
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                out = pb_utils.get_output_tensor_by_name(answer, "STAMP")
                if out is None:  # the empty final response
                    continue
                stamps.append(int(out.as_numpy()[0]))
                if len(stamps) == stop_after:
                    break  # the iterator is dropped, not cancelled
                if len(stamps) == 1:
                    time.sleep(pause_s)
                    woke = time.monotonic_ns()
            early = sum(1 for s in stamps if s < woke)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("COUNT", np.array([len(stamps)], dtype=np.int64)),
                        pb_utils.Tensor("EARLY", np.array([early], dtype=np.int64)),
                    ]
                )
            )
        return responses
