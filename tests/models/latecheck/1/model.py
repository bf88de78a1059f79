"""latecheck: did a request's input change while the model was reading it? (see config)"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.intact = True

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            params = json.loads(request.parameters() or "{}")
            if params.get("report"):
                out = np.array([1.0 if self.intact else 0.0], dtype=np.float32)
            else:
                data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                first = np.array(data, copy=True)
                time.sleep(float(params.get("delay_ms", 0)) / 1000.0)
                out = np.array(data, copy=True)
                self.intact = bool(np.array_equal(first, out))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses
