"""repeat: a decoupled model. For each element of IN one response (OUT = element, IDX = index).

Request parameter "mode":
  thread (default)  responses from a thread started by execute, after execute has returned;
                    then the final flag alone
  execute           responses from execute itself, the final flag on the last response
  error_after_two   two responses, then an error response with the final flag
  die_after_two     two responses, then the worker process exits
  slow              like thread, 20 ms between responses
Parameter "delay_ms" sleeps that long before the first response; "work_ms" (mode execute)
keeps execute running that long after its final response.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.threads: list[threading.Thread] = []

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().copy()
            params = json.loads(request.parameters())
            mode = params.get("mode", "thread")
            sender = request.get_response_sender()
            if mode == "execute":
                self._send_all(sender, values, params, final_on_last=True)
                time.sleep(params.get("work_ms", 0) / 1000)
            else:
                t = threading.Thread(target=self._send_all, args=(sender, values, params, False), daemon=True)
                t.start()
                self.threads.append(t)
        return None

    def _send_all(self, sender: Any, values: np.ndarray, params: dict[str, Any], final_on_last: bool) -> None:
        mode = params.get("mode", "thread")
        time.sleep(params.get("delay_ms", 0) / 1000)
        for i, v in enumerate(values):
            if mode in ("error_after_two", "die_after_two") and i == 2:
                if mode == "die_after_two":
                    os._exit(3)
                error = pb_utils.TritonError(f"failed at element {i}")
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                return
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUT", np.array([v], dtype=np.int32)),
                    pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32)),
                ]
            )
            last = final_on_last and i == len(values) - 1
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
            if mode == "slow":
                time.sleep(0.02)
                if sender.is_cancelled():
                    pb_utils.Logger.log_info(f"repeat stopped: cancelled after {i + 1} responses")
                    return
        if not (final_on_last and len(values)):
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        for t in self.threads:
            t.join(timeout=1.0)
