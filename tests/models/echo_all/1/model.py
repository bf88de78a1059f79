"""Echo every input IN_<TYPE> as OUT_<TYPE>: exercises every datatype end to end."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = []
            for tensor in request.inputs():
                name = "OUT_" + tensor.name()[3:]
                outputs.append(pb_utils.Tensor(name, np.array(tensor.as_numpy(), copy=True)))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
