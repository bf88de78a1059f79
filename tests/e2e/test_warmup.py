"""Model warmup through the real server: samples of zero, random and file data run on every
instance before the model is ready; a failing sample fails the load with Triton's text."""

from __future__ import annotations

import json
import struct
import textwrap
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess

# records every request it executes (batch size, input values) in a file next to itself;
# sleeps when asked (WAIT input > 0) and fails on a negative one
MODEL = """
import json
import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.log = os.path.join(os.path.dirname(__file__), "seen.jsonl")

    def execute(self, requests):
        out = []
        for r in requests:
            wait = pb_utils.get_input_tensor_by_name(r, "WAIT").as_numpy()
            data = pb_utils.get_input_tensor_by_name(r, "DATA").as_numpy()
            text = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()
            with open(self.log, "a") as f:
                f.write(json.dumps({"batch": len(requests), "wait": wait.tolist(), "data": data.tolist(),
                                    "text": [t.decode() for t in text.reshape(-1)]}) + "\\n")
            if float(wait.reshape(-1)[0]) < 0:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative wait")))
                continue
            time.sleep(float(wait.reshape(-1)[0]))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", data.astype(np.float32))]))
        return out
"""

CONFIG = """
backend: "python"
max_batch_size: 8
input [
  {{ name: "WAIT", data_type: TYPE_FP32, dims: [1] }},
  {{ name: "DATA", data_type: TYPE_INT32, dims: [4] }},
  {{ name: "TEXT", data_type: TYPE_STRING, dims: [2] }}
]
output [{{ name: "OUT", data_type: TYPE_FP32, dims: [4] }}]
instance_group [{{ kind: KIND_CPU, count: {count} }}]
{warmup}
"""

ZERO = """
model_warmup [{
  name: "zeros" batch_size: 3 count: 2
  inputs { key: "WAIT" value: { data_type: TYPE_FP32 dims: [1] zero_data: true } }
  inputs { key: "DATA" value: { data_type: TYPE_INT32 dims: [4] random_data: true } }
  inputs { key: "TEXT" value: { data_type: TYPE_STRING dims: [2] random_data: true } }
},
{
  name: "from_files" batch_size: 1
  inputs { key: "WAIT" value: { data_type: TYPE_FP32 dims: [1] input_data_file: "wait" } }
  inputs { key: "DATA" value: { data_type: TYPE_INT32 dims: [4] input_data_file: "data" } }
  inputs { key: "TEXT" value: { data_type: TYPE_STRING dims: [2] input_data_file: "text" } }
}]
"""

FAILING = """
model_warmup [{
  name: "bad" batch_size: 1
  inputs { key: "WAIT" value: { data_type: TYPE_FP32 dims: [1] input_data_file: "wait" } }
  inputs { key: "DATA" value: { data_type: TYPE_INT32 dims: [4] zero_data: true } }
  inputs { key: "TEXT" value: { data_type: TYPE_STRING dims: [2] zero_data: true } }
}]
"""


def _model(repo: Path, name: str, warmup: str, wait: float, count: int = 1) -> Path:
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    (d / "config.pbtxt").write_text(CONFIG.format(count=count, warmup=warmup))
    (d / "warmup").mkdir()
    (d / "warmup" / "wait").write_bytes(np.array([wait], dtype=np.float32).tobytes())
    (d / "warmup" / "data").write_bytes(np.array([1, 2, 3, 4], dtype=np.int32).tobytes())
    (d / "warmup" / "text").write_bytes(b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"cde")))
    return d


def _seen(model_dir: Path) -> list[dict[str, object]]:
    path = model_dir / "1" / "seen.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_warmup_runs_on_every_instance_before_ready(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    model = _model(repo, "warm", ZERO, wait=1.5, count=2)
    srv = ServerProcess(repo)
    fresh_server.append(srv)
    srv.start(wait_ready=False)
    c = httpclient.InferenceServerClient(srv.url)
    # the file sample sleeps 1.5 s on each instance: not ready meanwhile
    deadline = time.monotonic() + 60
    saw_not_ready = False
    while not c.is_model_ready("warm"):
        saw_not_ready = saw_not_ready or bool(_seen(model))
        assert time.monotonic() < deadline, srv.log
        time.sleep(0.05)
    assert saw_not_ready, "the model was ready before its warmup ran"
    seen = _seen(model)
    # per instance: "zeros" twice as one batch of 3, then "from_files" once (batch of 1)
    assert len(seen) == 2 * (2 * 3 + 1), seen
    zeros = [s for s in seen if s["batch"] == 3]
    files = [s for s in seen if s["batch"] == 1]
    assert len(zeros) == 12 and len(files) == 2
    assert all(s["wait"] == [[0.0]] and s["text"] == ["", ""] for s in zeros)
    assert all(np.array(s["data"]).shape == (1, 4) for s in zeros)
    assert all(s["data"] == [[1, 2, 3, 4]] and s["text"] == ["ab", "cde"] and s["wait"] == [[1.5]] for s in files)
    assert srv.log.count("running warmup sample 'from_files'") == 2
    # warmup requests are not client traffic
    stats = c.get_inference_statistics("warm")["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] == 0
    inp = [httpclient.InferInput("WAIT", [1, 1], "FP32"), httpclient.InferInput("DATA", [1, 4], "INT32")]
    inp.append(httpclient.InferInput("TEXT", [1, 2], "BYTES"))
    inp[0].set_data_from_numpy(np.zeros((1, 1), np.float32))
    inp[1].set_data_from_numpy(np.array([[5, 6, 7, 8]], np.int32))
    inp[2].set_data_from_numpy(np.array([[b"x", b"y"]], dtype=np.object_))
    assert c.infer("warm", inp).as_numpy("OUT").tolist() == [[5.0, 6.0, 7.0, 8.0]]
    c.close()
    assert srv.terminate() == 0


def test_failing_warmup_fails_the_load(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _model(repo, "cold", FAILING, wait=-1.0)
    _model(repo, "fine", "", wait=0.0)
    short = FAILING.replace('input_data_file: "wait"', 'input_data_file: "missing"')
    _model(repo, "missing_file", short, wait=0.0)
    srv = ServerProcess(repo)
    fresh_server.append(srv)
    srv.start()
    c = srv.client()
    assert c.is_model_ready("fine")
    assert not c.is_model_ready("cold") and not c.is_model_ready("missing_file")
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert "failed to run warmup sample 'bad': negative wait" in index["cold"]["reason"], index["cold"]
    assert "cannot read warmup/missing" in index["missing_file"]["reason"], index["missing_file"]
    assert srv.terminate() == 0
