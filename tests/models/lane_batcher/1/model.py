"""Identity that reports how many requests shared each execute() call."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        delay = max(json.loads(r.parameters() or "{}").get("delay_ms", 0) for r in requests)
        time.sleep(delay / 1000.0)
        n = len(requests)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            count = np.full((x.shape[0], 1), n, dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x), pb_utils.Tensor("REQUESTS", count)])
            )
        return responses
