"""Identity that sleeps for the request parameter ``delay_ms`` (default 0) first."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            delay_ms = json.loads(request.parameters() or "{}").get("delay_ms", 0)
            time.sleep(float(delay_ms) / 1000.0)
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(data, copy=True))]))
        return responses
