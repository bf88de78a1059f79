"""Writes to stdout and stderr (``shoal workers logs``): a line on each at load, a line on
each per request naming INPUT0; INPUT0 = -1 writes a last line on stderr and exits with
status 3 (a crash to triage)."""

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        print(f"chatty loaded in pid {os.getpid()}")
        print(f"chatty stderr at load in pid {os.getpid()}", file=sys.stderr)

    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()[0])
            if value == -1:
                print("chatty is about to exit with status 3", file=sys.stderr, flush=True)
                os._exit(3)
            print(f"chatty got {value}")
            print(f"chatty warns about {value}", file=sys.stderr)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array([value], dtype=np.int32))])
            )
        return responses
