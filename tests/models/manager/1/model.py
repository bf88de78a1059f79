"""manager: pb_utils.load_model / unload_model / is_model_ready from inside a model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            action = pb_utils.get_input_tensor_by_name(request, "ACTION").as_numpy()[0].decode()
            name = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0].decode()
            params = json.loads(request.parameters())
            try:
                if action == "load":
                    files = {k: v.encode() for k, v in params.get("files", {}).items()}
                    pb_utils.load_model(name, config=params.get("config", ""), files=files)
                elif action == "unload":
                    pb_utils.unload_model(name)
                ready = pb_utils.is_model_ready(name)
            except pb_utils.TritonModelException as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("READY", np.array([ready]))]))
        return responses
