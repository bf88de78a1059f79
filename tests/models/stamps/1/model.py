"""stamps: see config.pbtxt."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            count = len(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy())
            threading.Thread(target=self._stream, args=(request.get_response_sender(), count), daemon=True).start()
        return None

    def _stream(self, sender: Any, count: int) -> None:
        for _ in range(count):
            stamp = np.array([time.monotonic_ns()], dtype=np.int64)
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("STAMP", stamp)]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        pb_utils.Logger.log_info(f"stamps: all {count} sent")
