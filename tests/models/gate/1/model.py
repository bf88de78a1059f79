"""OUTPUT0 = INPUT0; raises on a negative value; SIGKILLs itself on -99."""

import os
import signal

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if data.size and data[0] == -99:
                os.kill(os.getpid(), signal.SIGKILL)
            if (data < 0).any():
                raise ValueError("gate refuses negative values")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(data, copy=True))]))
        return responses
