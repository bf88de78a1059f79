"""Flow control of decoupled streams through the real server: a client that stops reading
stops the model's response sender (it waits inside ``send``) instead of filling the router's
memory; once the client reads again every response arrives, in order."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.server import ServerProcess

N = 5000
SIZE = 4096  # bytes of each response: N of them are 20 MB, more than any buffer on the way

# sends N responses of SIZE bytes from inside execute, writing how many it has sent
FLOOD = f"""
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        progress = os.path.join(os.path.dirname(__file__), "sent")
        for request in requests:
            sender = request.get_response_sender()
            for i in range({N}):
                out = np.full({SIZE} // 4, i, dtype=np.int32)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
                if i % 50 == 0:
                    with open(progress, "w") as f:
                        f.write(str(i))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "IN", data_type: TYPE_INT32, dims: [1] }]
output [{ name: "OUT", data_type: TYPE_INT32, dims: [-1] }]
"""


def _sent(model_dir: Path) -> int:
    try:
        return int((model_dir / "1" / "sent").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_a_reader_that_stops_stops_the_model(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    model = tmp_path / "repo" / "flood"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(textwrap.dedent(FLOOD))
    (model / "config.pbtxt").write_text(CONFIG)
    srv = ServerProcess(tmp_path / "repo")
    fresh_server.append(srv)
    srv.start()
    channel = grpc.insecure_channel(srv.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="flood")
    t = req.inputs.add(name="IN", datatype="INT32", shape=[1])
    t.contents.int_contents.append(1)
    responses = stub.ModelStreamInfer(iter([req]))
    first = next(responses)  # the stream is open and the model is sending
    assert not first.error_message
    deadline = time.monotonic() + 10
    before = -1
    while time.monotonic() < deadline:  # the model stops advancing: its sender waits
        time.sleep(1.0)
        now = _sent(model)
        if now == before:
            break
        before = now
    stuck = _sent(model)
    assert 0 < stuck < N // 2, f"the model sent {stuck} of {N} responses to a client that reads nothing"
    # reading again: everything arrives, in order
    got = [int(np.frombuffer(first.infer_response.raw_output_contents[0], dtype=np.int32)[0])]
    for r in responses:
        assert not r.error_message, r.error_message
        if r.infer_response.raw_output_contents:
            got.append(int(np.frombuffer(r.infer_response.raw_output_contents[0], dtype=np.int32)[0]))
        if r.infer_response.parameters["triton_final_response"].bool_param:
            break
    assert got == list(range(N))
    channel.close()
    assert srv.terminate() == 0
