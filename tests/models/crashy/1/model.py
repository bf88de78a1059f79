"""INPUT0 selects the behaviour: 0 echo, 1 SIGKILL itself, 2 segfault, 3 raise, 4 exit(3),
5 sleep 1 s then echo, 6 sleep 5 s then echo. While a file ``hold_load`` exists in the
model's directory, loading waits for it to go (at most 30 s): a test can hold a restarting
instance in its loading state."""

import ctypes
import os
import signal
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        hold = os.path.join(args["model_repository"], "hold_load")
        deadline = time.monotonic() + 30
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)

    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()[0])
            if value == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            elif value == 2:
                ctypes.string_at(0)
            elif value == 3:
                raise ValueError("crashy was asked to fail")
            elif value == 4:
                os._exit(3)
            elif value == 5:
                time.sleep(1.0)
            elif value == 6:
                time.sleep(5.0)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array([value], dtype=np.int32))])
            )
        return responses
