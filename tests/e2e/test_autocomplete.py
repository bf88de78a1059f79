"""Auto-complete through the real server: ONNX configs completed from the model (also with
no config.pbtxt at all), a Python model's auto_complete_config hook, the strict mode that
turns it off, and clear errors when a config and its model disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, make_repository


def _reason(h: httpclient.InferenceServerClient, name: str) -> str:
    entry = next(e for e in h.get_model_repository_index() if e["name"] == name)
    return str(entry.get("reason", ""))


def _repo(tmp_path: Path) -> Path:
    repo = make_repository(tmp_path / "repo", "simple_onnx", "auto_py")
    (repo / "simple_onnx" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    shutil_copy = repo / "bare_onnx" / "1"
    shutil_copy.mkdir(parents=True)
    (shutil_copy / "model.onnx").write_bytes((repo / "simple_onnx" / "1" / "model.onnx").read_bytes())
    wrong = repo / "wrong_onnx"
    (wrong / "1").mkdir(parents=True)
    (wrong / "1" / "model.onnx").write_bytes((repo / "simple_onnx" / "1" / "model.onnx").read_bytes())
    (wrong / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, '
        '{ name: "INPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 16 ] }, '
        '{ name: "OUTPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]\n'
    )
    return repo


def test_auto_complete(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    srv = ServerProcess(_repo(tmp_path), "--strict-readiness=false").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        for name in ("simple_onnx", "bare_onnx"):
            cfg = h.get_model_config(name)
            assert cfg["max_batch_size"] == 4, cfg
            assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in cfg["input"]] == [
                ("INPUT0", "TYPE_INT32", [16]),
                ("INPUT1", "TYPE_INT32", [16]),
            ]
            assert {o["name"] for o in cfg["output"]} == {"OUTPUT0", "OUTPUT1"}
            assert "dynamic_batching" in cfg
            a = httpclient.InferInput("INPUT0", [2, 16], "INT32")
            a.set_data_from_numpy(np.ones((2, 16), dtype=np.int32))
            b = httpclient.InferInput("INPUT1", [2, 16], "INT32")
            b.set_data_from_numpy(np.ones((2, 16), dtype=np.int32))
            assert h.infer(name, [a, b]).as_numpy("OUTPUT0").tolist() == [[2] * 16] * 2
        cfg = h.get_model_config("auto_py")
        assert cfg["max_batch_size"] == 8 and "dynamic_batching" in cfg
        x = httpclient.InferInput("IN", [1, 3], "FP32")
        x.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
        assert h.infer("auto_py", [x]).as_numpy("OUT").tolist() == [[2, 2, 2]]
        # a config that disagrees with its model: a load error naming the tensor
        assert not h.is_model_ready("wrong_onnx")
        reason = _reason(h, "wrong_onnx")
        assert "input 'INPUT0' has data type TYPE_FP32 in the configuration but" in reason, reason
        assert "(TYPE_INT32) in the model" in reason
    finally:
        h.close()
    assert srv.terminate() == 0


def test_strict_model_config_turns_it_off(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = _repo(tmp_path)
    (repo / "auto_py" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    @staticmethod\n"
        "    def auto_complete_config(c):\n"
        "        raise ValueError('not called in strict mode')\n"
    )
    srv = ServerProcess(repo, "--strict-model-config=true", "--strict-readiness=false").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        assert not h.is_model_ready("simple_onnx")
        assert "missing from the configuration" in _reason(h, "simple_onnx")
        assert "no config.pbtxt" in _reason(h, "bare_onnx")
    finally:
        h.close()
    assert srv.terminate() == 0


def test_failing_hook_is_a_load_error(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "auto_py", "identity_fp32")
    model = repo / "auto_py" / "1" / "model.py"
    model.write_text(model.read_text().replace("set_max_batch_size(8)", "set_max_batch_size(None)"))
    srv = ServerProcess(repo, "--strict-readiness=false").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        assert "auto_complete_config failed" in _reason(h, "auto_py")
        assert h.is_model_ready("identity_fp32")
    finally:
        h.close()
    assert srv.terminate() == 0
