"""bls_async: async def execute; per request two async_exec calls in flight at once."""

from __future__ import annotations

import asyncio
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            name = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0].decode()
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            calls = [
                pb_utils.InferenceRequest(model_name=name, requested_output_names=["OUTPUT0"], inputs=[a, b]),
                pb_utils.InferenceRequest(model_name=name, requested_output_names=["OUTPUT1"], inputs=[a, b]),
            ]
            first, second = await asyncio.gather(*(c.async_exec() for c in calls))
            for answer in (first, second):
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", pb_utils.get_output_tensor_by_name(first, "OUTPUT0").as_numpy()),
                        pb_utils.Tensor("OUTPUT1", pb_utils.get_output_tensor_by_name(second, "OUTPUT1").as_numpy()),
                    ]
                )
            )
        return responses
