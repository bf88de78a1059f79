"""Running sum per sequence, driven by the START / END / READY / CORRID control inputs
(READY false: a null request in an empty slot, answered with zeros).
CORRID_SEEN: the integer sequence id, or the length of a string one."""

import json
import os
import signal
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        delay_ms = max(json.loads(r.parameters() or "{}").get("delay_ms", 0) for r in requests)
        time.sleep(delay_ms / 1000.0)
        responses = []
        nulls = sum(1 for r in requests if not pb_utils.get_input_tensor_by_name(r, "READY").as_numpy().all())
        for row, request in enumerate(requests):
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()[0, 0])
            start = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy()[0, 0])
            end = float(pb_utils.get_input_tensor_by_name(request, "END").as_numpy()[0, 0])
            ready = bool(pb_utils.get_input_tensor_by_name(request, "READY").as_numpy()[0, 0])
            corrid = pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy()[0, 0]
            corrid = corrid if isinstance(corrid, bytes) else int(corrid)
            if value == -1:
                os.kill(os.getpid(), signal.SIGKILL)
            if not ready:
                # a null request filling an empty batch slot (direct strategy): no state change
                zeros = [pb_utils.Tensor(n, np.zeros((1, 1), np.int32)) for n in ("OUTPUT", "ROW", "NULLS")]
                zeros.append(pb_utils.Tensor("CORRID_SEEN", np.zeros((1, 1), np.uint64)))
                responses.append(pb_utils.InferenceResponse(zeros))
                continue
            if start:
                self.sums[corrid] = 0
            if corrid not in self.sums:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"no state for {corrid}")))
                continue
            self.sums[corrid] += value
            total = self.sums[corrid]
            if end:
                del self.sums[corrid]
            outs = [
                pb_utils.Tensor("OUTPUT", np.array([[total]], dtype=np.int32)),
                # string ids (CORRID of TYPE_STRING): their length
                pb_utils.Tensor(
                    "CORRID_SEEN", np.array([[len(corrid) if isinstance(corrid, bytes) else corrid]], np.uint64)
                ),
            ]
            outs += [  # where this request sat in the batch, and how many null requests it had
                pb_utils.Tensor("ROW", np.array([[row]], np.int32)),
                pb_utils.Tensor("NULLS", np.array([[nulls]], np.int32)),
            ]
            responses.append(pb_utils.InferenceResponse(outs))
        return responses
