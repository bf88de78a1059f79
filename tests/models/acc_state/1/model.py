"""Stateless step of a running sum: OUTPUT = SUM_OUT = SUM_IN + INPUT (per request)."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            total = (
                pb_utils.get_input_tensor_by_name(request, "SUM_IN").as_numpy()
                + pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            )
            outs = [pb_utils.Tensor("OUTPUT", total), pb_utils.Tensor("SUM_OUT", total)]
            responses.append(pb_utils.InferenceResponse(outs))
        return responses
