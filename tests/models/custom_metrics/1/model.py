"""custom_metrics: counts requests (counter), the last batch size (gauge) and INPUT0's values
(histogram); a request with parameter "crash" kills the worker first."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.requests = pb_utils.MetricFamily(
            name="shoal_test_requests", description="Requests seen by the model", kind=pb_utils.MetricFamily.COUNTER
        ).Metric(labels=labels)
        self.batch = pb_utils.MetricFamily(
            name="shoal_test_batch_size", description="Size of the last batch", kind=pb_utils.MetricFamily.GAUGE
        ).Metric(labels=labels)
        self.values = pb_utils.MetricFamily(
            name="shoal_test_values", description="INPUT0 values", kind=pb_utils.MetricFamily.HISTOGRAM
        ).Metric(labels=labels, buckets=[1.0, 10.0, 100.0])

    def execute(self, requests: list[Any]) -> list[Any]:
        self.batch.set(len(requests))
        responses = []
        for request in requests:
            if json.loads(request.parameters()).get("crash"):
                os._exit(9)
            self.requests.increment(1)
            self.values.observe(float(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()[0]))
            out = np.array([self.requests.value()], dtype=np.float64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses
