"""See config.pbtxt: 0 echo, 1 hold the GIL for good, 2 sleep for an hour."""

import re
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()[0])
            if value == 1:
                re.match(r"(a+)+$", "a" * 64 + "b")
            elif value == 2:
                time.sleep(3600)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array([value], dtype=np.int32))])
            )
        return responses
