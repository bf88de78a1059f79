"""bls_async_decoupled: see config.pbtxt."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN")

            def call(params: str = "{}", values: Any = values) -> Any:
                return pb_utils.InferenceRequest(
                    model_name="repeat", requested_output_names=["OUT"], inputs=[values], parameters=params
                )

            total = count = 0
            for answers in await asyncio.gather(*(call().async_exec(decoupled=True) for _ in range(3))):
                for answer in answers:
                    if answer.has_error():
                        raise pb_utils.TritonModelException(answer.error().message())
                    out = pb_utils.get_output_tensor_by_name(answer, "OUT")
                    if out is not None:  # the last response may be empty: the end of the stream
                        total += int(out.as_numpy()[0])
                        count += 1
            slow = await call('{"mode": "slow"}').async_exec(decoupled=True)
            cancelled = 0
            for _answer in slow:
                cancelled += 1
                slow.cancel()
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("SUM", np.array([total], dtype=np.int64)),
                        pb_utils.Tensor("COUNT", np.array([count], dtype=np.int64)),
                        pb_utils.Tensor("CANCELLED", np.array([cancelled], dtype=np.int64)),
                    ]
                )
            )
        return responses
