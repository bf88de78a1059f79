"""bls_flood: see config.pbtxt."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

THREADS = 8


def _call(x: np.ndarray) -> Any:
    return pb_utils.InferenceRequest(
        model_name="identity_fp32", requested_output_names=["OUTPUT0"], inputs=[pb_utils.Tensor("INPUT0", x)]
    )


def _check(answer: Any, x: np.ndarray) -> None:
    if answer.has_error():
        raise pb_utils.TritonModelException(answer.error().message())
    got = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
    if not np.array_equal(got, x):
        raise pb_utils.TritonModelException(f"answered {got[:2]} for {x[:2]}")


def _threads(n: int) -> int:
    errors: list[str] = []
    done = [0] * THREADS

    def work(t: int) -> None:
        try:
            for i in range(n):
                x = np.full(16, t * n + i, np.float32)
                _check(_call(x).exec(), x)
                done[t] += 1
        except Exception as exc:  # noqa: BLE001 - reported as the request's error
            errors.append(str(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise pb_utils.TritonModelException(errors[0])
    return sum(done)


class TritonPythonModel:
    async def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            if json.loads(request.parameters() or "{}").get("mode") == "threads":
                ok = _threads(n)
            else:
                xs = [np.full(16, i, np.float32) for i in range(n)]
                for answer, x in zip(await asyncio.gather(*(_call(x).async_exec() for x in xs)), xs, strict=True):
                    _check(answer, x)
                ok = n
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OK", np.array([ok], np.int64))]))
        return responses
