"""OUTPUT0 = INPUT0 + 1 in the flattened shape the model sees; SEEN_RANK = its rank."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            rank = np.full((x.shape[0], 1), x.ndim, dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + 1), pb_utils.Tensor("SEEN_RANK", rank)])
            )
        return responses
