"""cancellable: a long request that notices its client going away."""

from __future__ import annotations

import json
import time
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            marker = json.loads(request.parameters()).get("marker", "")
            start = time.monotonic()
            while time.monotonic() - start < 10:
                if request.is_cancelled():
                    with open(marker, "w") as f:
                        f.write(f"{time.monotonic() - start:.2f}")
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("cancelled", 7)))
                    break
                time.sleep(0.02)
            else:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0")
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x.as_numpy())]))
        return responses
