"""SCORES = INPUT0, COUNTS = INPUT0 as int32."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            outs = [pb_utils.Tensor("SCORES", x), pb_utils.Tensor("COUNTS", x.astype(np.int32))]
            responses.append(pb_utils.InferenceResponse(outs))
        return responses
