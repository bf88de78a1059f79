"""Counts each request's executions per sequence (its correlation ID, given by the server);
reschedules it until it has run N times. A request with N = 0 fails (an error response)."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.runs = {}
        self.peak = {}

    def execute(self, requests):
        time.sleep(0.002)  # an iteration takes a while: later requests join the batch
        responses = []
        for request in requests:
            seq = request.correlation_id()
            if seq == 0:  # a null request (the direct strategy's padding rows): nothing to count
                zero = np.zeros((1, 1), np.int32)
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor("ITERATIONS", zero), pb_utils.Tensor("PEAK", zero)])
                )
                continue
            if request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                self.runs[seq], self.peak[seq] = 0, 0
            self.runs[seq] += 1
            self.peak[seq] = max(self.peak[seq], len(requests))
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy().reshape(-1)[0])
            if n <= 0:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("N must be positive")))
            elif self.runs[seq] < n:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
            else:
                runs, peak = self.runs.pop(seq), self.peak.pop(seq)
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("ITERATIONS", np.array([[runs]], np.int32)),
                            pb_utils.Tensor("PEAK", np.array([[peak]], np.int32)),
                        ]
                    )
                )
        return responses
