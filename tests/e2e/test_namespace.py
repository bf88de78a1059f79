"""Shoal's packages live under ``shoal.*``: a model that imports a top-level ``proto`` (the
import name of Google's proto-plus, pulled in by every google-cloud client library) gets
that package, not Shoal's contracts, and the server serves it."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from tests.e2e.server import ServerProcess

MODEL = """
import numpy as np
import proto  # proto-plus's import name
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        marker = np.array([proto.MARKER.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("WHICH", marker)]) for _ in requests]
"""
CONFIG = """
name: "uses_proto"
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "WHICH", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def test_a_model_importing_proto_gets_proto_plus(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    fake = tmp_path / "site"
    (fake / "proto").mkdir(parents=True)
    (fake / "proto" / "__init__.py").write_text('MARKER = "proto-plus"\n')
    model = tmp_path / "repo" / "uses_proto"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL)
    srv = ServerProcess(tmp_path / "repo", env={"PYTHONPATH": str(fake)}).start()
    fresh_server.append(srv)
    c = srv.client()
    assert c.is_model_ready("uses_proto"), srv.log
    body = {"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "data": [1]}]}
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v2/models/uses_proto/infer", body=json.dumps(body).encode())
    reply = json.loads(conn.getresponse().read())
    conn.close()
    assert "outputs" in reply and reply["outputs"][0]["data"] == ["proto-plus"], (reply, srv.log[-2000:])
    assert srv.terminate() == 0
