"""Reports the UUID of CUDA device 0 as this worker sees it, its pid and model_instance_device_id."""

import os
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.device_id = int(args["model_instance_device_id"])
        self.kind = args["model_instance_kind"]
        props = torch.cuda.get_device_properties(self.device_id)
        self.uuid = str(props.uuid).encode()

    def execute(self, requests):
        responses = []
        for request in requests:
            delay = int(pb_utils.get_input_tensor_by_name(request, "DELAY_MS").as_numpy()[0])
            time.sleep(delay / 1000.0)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("UUID", np.array([self.uuid], dtype=np.object_)),
                        pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int32)),
                        pb_utils.Tensor("DEVICE_ID", np.array([self.device_id], dtype=np.int32)),
                    ]
                )
            )
        return responses
