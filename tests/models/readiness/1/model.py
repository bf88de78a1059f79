import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.mode = 0
        self.checks = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            self.mode = int(pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([self.checks], np.int32))]))
        return responses

    async def is_ready(self):
        self.checks += 1
        if self.mode == 2:
            raise RuntimeError("the feature store is unreachable")
        if self.mode == 3:
            return "yes"
        if self.mode == 4:
            await asyncio.sleep(6)
        return self.mode == 0
