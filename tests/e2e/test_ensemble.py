"""Ensembles through the real server: the example pipeline (Python -> ONNX -> Python) over
HTTP, gRPC and client shared memory; a diamond whose branches run in parallel; a failing
and a crashing middle step; large intermediate tensors passed between workers without
leaking their shared memory; composing models batching under concurrent load; nested and
non-batching ensembles; explicit load / unload with dependents; poll mode picking up a
changed composing model."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until

PIPELINE = ("preprocess", "mlp_onnx", "postprocess", "pipeline")
MODELS = (
    *PIPELINE, "slow", "gate", "add_sub", "accumulator",
    "ens_diamond", "ens_chain3", "ens_nested", "ens_flat", "ens_tap", "ens_seq", "ens_outer",
)  # fmt: skip
KEY_PREFIX = f"shoaltest_{os.getpid()}_ens_"


@pytest.fixture(scope="module")
def eserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), *MODELS)
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _client(srv: ServerProcess, proto: str) -> Any:
    if proto == "http":
        return httpclient.InferenceServerClient(srv.url)
    return grpcclient.InferenceServerClient(srv.grpc_url)


def _mod(client: Any) -> Any:
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def _infer(client: Any, model: str, outputs: list[str] | None = None, **inputs: np.ndarray) -> Any:
    mod = _mod(client)
    ins = []
    for name, value in inputs.items():
        dt = {"uint8": "UINT8", "float32": "FP32", "int32": "INT32"}[value.dtype.name]
        i = mod.InferInput(name, list(value.shape), dt)
        i.set_data_from_numpy(value)
        ins.append(i)
    outs = [mod.InferRequestedOutput(o) for o in outputs] if outputs is not None else None
    return client.infer(model, ins, outputs=outs)


def _by_hand(client: Any, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The three models called one after another, as a client would without ensembles."""
    pixels = _infer(client, "preprocess", RAW=raw).as_numpy("PIXELS")
    logits = _infer(client, "mlp_onnx", INPUT0=pixels).as_numpy("OUTPUT0")
    r = _infer(client, "postprocess", LOGITS=logits)
    return r.as_numpy("PROBS"), r.as_numpy("CLASS")


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_pipeline_matches_the_models_called_by_hand(eserver: ServerProcess, proto: str) -> None:
    client = _client(eserver, proto)
    try:
        raw = np.random.default_rng(1).integers(0, 256, (5, 256), dtype=np.uint8)
        r = _infer(client, "pipeline", RAW=raw)
        probs, cls = _by_hand(client, raw)
        np.testing.assert_allclose(r.as_numpy("PROBS"), probs, rtol=1e-6)
        np.testing.assert_array_equal(r.as_numpy("CLASS"), cls)
        assert r.as_numpy("CLASS").shape == (5, 1)
        only = _infer(client, "pipeline", ["CLASS"], RAW=raw)
        assert only.as_numpy("PROBS") is None
        np.testing.assert_array_equal(only.as_numpy("CLASS"), cls)
        meta = client.get_model_metadata("pipeline")
        platform = meta["platform"] if isinstance(meta, dict) else meta.platform
        assert platform == "ensemble"
    finally:
        client.close()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_pipeline_with_shared_memory(eserver: ServerProcess, proto: str) -> None:
    """RAW read from and PROBS written to client system shared memory; CLASS inline."""
    client = _client(eserver, proto)
    raw = np.random.default_rng(2).integers(0, 256, (4, 256), dtype=np.uint8)
    h_in = shm.create_shared_memory_region("ens_in", f"/{KEY_PREFIX}in_{proto}", raw.nbytes)
    h_out = shm.create_shared_memory_region("ens_out", f"/{KEY_PREFIX}out_{proto}", 4 * 16 * 4)
    try:
        shm.set_shared_memory_region(h_in, [raw])
        client.register_system_shared_memory("ens_in", f"/{KEY_PREFIX}in_{proto}", raw.nbytes)
        client.register_system_shared_memory("ens_out", f"/{KEY_PREFIX}out_{proto}", 4 * 16 * 4)
        mod = _mod(client)
        i = mod.InferInput("RAW", [4, 256], "UINT8")
        i.set_shared_memory("ens_in", raw.nbytes)
        o_probs = mod.InferRequestedOutput("PROBS")
        o_probs.set_shared_memory("ens_out", 4 * 16 * 4)
        r = client.infer("pipeline", [i], outputs=[o_probs, mod.InferRequestedOutput("CLASS")])
        probs, cls = _by_hand(client, raw)
        np.testing.assert_allclose(shm.get_contents_as_numpy(h_out, np.float32, [4, 16]), probs, rtol=1e-6)
        np.testing.assert_array_equal(r.as_numpy("CLASS"), cls)
    finally:
        client.unregister_system_shared_memory()
        client.close()
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)


def test_output_in_shared_memory_also_read_by_a_step(eserver: ServerProcess) -> None:
    """ens_tap: A goes to the client's region and the next step reads it from there."""
    client = grpcclient.InferenceServerClient(eserver.grpc_url)
    x = np.random.default_rng(8).random(1000, dtype=np.float32)
    key = f"/{KEY_PREFIX}tap"
    h = shm.create_shared_memory_region("tap", key, x.nbytes)
    try:
        client.register_system_shared_memory("tap", key, x.nbytes)
        i = grpcclient.InferInput("X", [x.size], "FP32")
        i.set_data_from_numpy(x)
        a = grpcclient.InferRequestedOutput("A")
        a.set_shared_memory("tap", x.nbytes)
        r = client.infer("ens_tap", [i], outputs=[a, grpcclient.InferRequestedOutput("Y")])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [x.size]), x)
        np.testing.assert_array_equal(r.as_numpy("Y"), x)
    finally:
        client.unregister_system_shared_memory()
        client.close()
        shm.destroy_shared_memory_region(h)


def test_sequence_through_an_ensemble(eserver: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(eserver.grpc_url)
    try:
        for sid in (71, 72):
            for step, value in enumerate((3, 4, 5)):
                i = grpcclient.InferInput("IN", [1, 1], "INT32")
                i.set_data_from_numpy(np.array([[value + sid]], dtype=np.int32))
                r = client.infer("ens_seq", [i], sequence_id=sid, sequence_start=step == 0, sequence_end=step == 2)
                assert int(r.as_numpy("SUM")[0, 0]) == sum((3, 4, 5)[: step + 1]) + sid * (step + 1)
        with pytest.raises(InferenceServerException, match="step 0 \\(model 'accumulator'\\).*correlation ID"):
            client.infer("ens_seq", [i])
    finally:
        client.close()


def test_diamond_branches_run_in_parallel(eserver: ServerProcess) -> None:
    """Two 1 s branches on a model with 2 instances: the request takes ~1 s, not 2 (1 s, not
    less, so that a loaded machine's scheduling delays stay well inside the margin)."""
    client = grpcclient.InferenceServerClient(eserver.grpc_url)
    try:
        x = np.array([1, 2, 3, 4], dtype=np.float32)
        i = grpcclient.InferInput("X", [4], "FP32")
        i.set_data_from_numpy(x)
        client.infer("ens_diamond", [i])  # warm
        t0 = time.monotonic()
        r = client.infer("ens_diamond", [i], parameters={"delay_ms": 1000})
        elapsed = time.monotonic() - t0
        np.testing.assert_array_equal(r.as_numpy("SUM"), 2 * x)
        np.testing.assert_array_equal(r.as_numpy("DIFF"), np.zeros(4, np.float32))
        assert 1.0 <= elapsed < 1.7, elapsed
    finally:
        client.close()


def test_middle_step_failures_name_the_step(eserver: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(eserver.url)
    try:
        with pytest.raises(InferenceServerException) as err:
            _infer(h, "ens_chain3", X=np.array([1, -2], dtype=np.float32))
        assert "in ensemble 'ens_chain3', step 1 (model 'gate')" in str(err.value)
        assert "gate refuses negative values" in str(err.value)
        gate_pid = eserver.worker_pids("gate")[-1]
        with pytest.raises(InferenceServerException) as err:
            _infer(h, "ens_chain3", X=np.array([-99], dtype=np.float32))  # the gate's worker dies
        assert err.value.status() == "503", err.value
        assert "step 1 (model 'gate')" in str(err.value) and "died" in str(err.value)
        wait_until(lambda: h.is_model_ready("gate") and eserver.worker_pids("gate")[-1] != gate_pid)
        x = np.arange(6, dtype=np.float32)
        np.testing.assert_array_equal(_infer(h, "ens_chain3", X=x).as_numpy("Y"), x)
        stats = h.get_inference_statistics("ens_chain3")["model_stats"][0]["inference_stats"]
        assert stats["fail"]["count"] >= 2 and stats["success"]["count"] >= 1
    finally:
        h.close()


def test_large_intermediates_are_given_back(eserver: ServerProcess) -> None:
    """1 MiB tensors through three workers 60 times (and failures in between): the step
    outputs, read in place by the next worker, are released, so no arena grows."""
    client = grpcclient.InferenceServerClient(eserver.grpc_url)
    try:
        x = np.random.default_rng(3).random(1 << 18, dtype=np.float32)  # 1 MiB
        bad = x.copy()
        bad[7] = -1
        for _ in range(3):
            np.testing.assert_array_equal(_infer(client, "ens_chain3", X=x).as_numpy("Y"), x)
        before = sorted(eserver.segments())
        for k in range(60):
            model = "ens_outer" if k % 2 else "ens_chain3"  # ens_outer: the nested ensemble reads x1 in place
            if k % 10 == 5:
                with pytest.raises(InferenceServerException, match="gate refuses"):
                    _infer(client, model, X=bad)
                continue
            np.testing.assert_array_equal(_infer(client, model, X=x).as_numpy("Y"), x)
        # clients that give up while their ensemble runs (the deadline passes in step 2)
        i = grpcclient.InferInput("X", [x.size], "FP32")
        i.set_data_from_numpy(x)
        for _ in range(4):
            with pytest.raises(InferenceServerException, match="Deadline"):
                client.infer("ens_chain3", [i], parameters={"delay_ms": 300}, client_timeout=0.45)
        time.sleep(0.5)  # the abandoned last steps finish in their workers
        np.testing.assert_array_equal(_infer(client, "ens_chain3", X=x).as_numpy("Y"), x)
        # an instance's arena starts with one 16 MiB segment (made at its first large
        # output); ~150 MiB of outputs that were not given back would have added more
        grown = [n for n in eserver.segments() if n not in before and not n.endswith("_0")]
        assert not grown, (before, eserver.segments())
    finally:
        client.close()


def test_concurrent_requests_batch_in_composing_models(eserver: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(eserver.url)

    def stats(model: str) -> tuple[int, int]:
        s = h.get_inference_statistics(model)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    before = {m: stats(m) for m in PIPELINE}
    errors: list[Any] = []
    raw = np.random.default_rng(4).integers(0, 256, (1, 256), dtype=np.uint8)
    expect = _by_hand(h, raw)[1]
    mid = {m: stats(m) for m in PIPELINE}

    def worker() -> None:
        g = grpcclient.InferenceServerClient(eserver.grpc_url)
        try:
            for _ in range(8):
                cls = _infer(g, "pipeline", RAW=raw).as_numpy("CLASS")
                if not np.array_equal(cls, expect):
                    errors.append(cls)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            g.close()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = {m: stats(m) for m in PIPELINE}
    h.close()
    assert not errors, errors[:3]
    assert mid["pipeline"] == before["pipeline"]
    assert after["pipeline"][0] - mid["pipeline"][0] == 128
    for m in ("preprocess", "mlp_onnx", "postprocess"):
        inferences = after[m][0] - mid[m][0]
        executions = after[m][1] - mid[m][1]
        assert inferences == 128, (m, inferences)
        assert executions < 128, (m, executions)  # requests of different ensemble runs shared executions


def test_nested_and_non_batching_ensembles(eserver: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(eserver.grpc_url)
    try:
        raw = np.random.default_rng(5).integers(0, 256, (2, 256), dtype=np.uint8)
        _, cls = _by_hand(client, raw)
        r = _infer(client, "ens_nested", RAW=raw)
        np.testing.assert_array_equal(r.as_numpy("CLASS"), cls)
        np.testing.assert_allclose(r.as_numpy("PIXELS"), raw.astype(np.float32) / 255, rtol=1e-6)
        logits = _infer(client, "mlp_onnx", INPUT0=raw.astype(np.float32) / 255).as_numpy("OUTPUT0")
        np.testing.assert_allclose(_infer(client, "ens_flat", RAW=raw).as_numpy("LOGITS"), logits, rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
            _infer(client, "ens_nested", RAW=np.zeros((9, 256), np.uint8))
        with pytest.raises(InferenceServerException, match="unexpected shape for input 'RAW'"):
            _infer(client, "pipeline", RAW=np.zeros((1, 255), np.uint8))
    finally:
        client.close()


def test_shutdown_lets_ensembles_in_flight_finish(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """SIGTERM while a request is in the first step of an ensemble whose second step is
    another ensemble (slow -> ens_chain3): every later step still runs."""
    repo = make_repository(tmp_path / "repo", "slow", "gate", "ens_chain3", "ens_outer")
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    x = np.arange(3, dtype=np.float32)
    i = grpcclient.InferInput("X", [3], "FP32")
    i.set_data_from_numpy(x)
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(client.infer("ens_outer", [i], parameters={"delay_ms": 300}).as_numpy("Y"))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.15)
    assert srv.terminate() == 0
    t.join(30)
    client.close()
    assert len(results) == 1 and isinstance(results[0], np.ndarray), results
    np.testing.assert_array_equal(results[0], x)


def _state(index: list[dict[str, str]], name: str) -> tuple[str, str]:
    for e in index:
        if e["name"] == name:
            return e.get("state", ""), e.get("reason", "")
    return "", ""


def test_explicit_load_and_unload_dependents(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", *PIPELINE, "ens_nested")
    for name, other in (("cyc_a", "cyc_b"), ("cyc_b", "cyc_a")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}" platform: "ensemble" max_batch_size: 0 '
            'input [ { name: "X", data_type: TYPE_FP32, dims: [ 1 ] } ] '
            'output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1 ] } ] '
            f'ensemble_scheduling {{ step [ {{ model_name: "{other}" model_version: -1 '
            'input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ] }'
        )
    srv = ServerProcess(repo, "--model-control-mode=explicit").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    raw = np.zeros((1, 256), np.uint8)
    try:
        g.load_model("ens_nested")  # loads pipeline, and pipeline its three models
        index = h.get_model_repository_index()
        for m in (*PIPELINE, "ens_nested"):
            assert _state(index, m)[0] == "READY", index
        assert _infer(h, "ens_nested", RAW=raw).as_numpy("CLASS").shape == (1, 1)

        h.unload_model("mlp_onnx")  # the ensembles stay loaded but cannot serve
        state, reason = _state(h.get_model_repository_index(), "pipeline")
        assert state == "UNAVAILABLE" and "composing model 'mlp_onnx' is not available" in reason
        assert not h.is_model_ready("pipeline") and not h.is_model_ready("ens_nested")
        with pytest.raises(InferenceServerException) as err:  # Triton's text and code; the index says why
            _infer(h, "pipeline", RAW=raw)
        assert err.value.status() == "404"
        assert err.value.message() == "Request for unknown model: 'pipeline' has no available versions"
        h.load_model("mlp_onnx")
        assert h.is_model_ready("ens_nested")

        with pytest.raises(InferenceServerException, match="ensembles form a cycle: cyc_a -> cyc_b -> cyc_a"):
            h.load_model("cyc_a")
        bad = (
            '{"name": "pipeline", "platform": "ensemble", "max_batch_size": 64,'
            '"input": [{"name": "RAW", "data_type": "TYPE_UINT8", "dims": [256]}],'
            '"output": [{"name": "CLASS", "data_type": "TYPE_INT32", "dims": [1]}],'
            '"ensemble_scheduling": {"step": [{"model_name": "preprocess", "model_version": -1,'
            '"input_map": {"RAW": "RAW"}, "output_map": {"PIXELS": "CLASS"}}]}}'
        )
        with pytest.raises(InferenceServerException) as err:
            h.load_model("pipeline", config=bad)
        assert "step 0 (model 'preprocess')" in str(err.value) and "FP32" in str(err.value), err.value
        assert h.is_model_ready("pipeline")  # the failed reload left the old one serving

        g.unload_model("ens_nested", unload_dependents=True)
        index = h.get_model_repository_index()
        for m in (*PIPELINE, "ens_nested"):
            assert _state(index, m)[0] != "READY", (m, index)
        assert not srv.worker_pids("nothing")
    finally:
        h.close()
        g.close()
    assert srv.terminate() == 0
    assert not srv.segments()


def test_poll_picks_up_a_changed_composing_model(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", *PIPELINE, "slow", "ens_tap", "gate")
    gate = tmp_path / "gate"
    shutil.move(repo / "gate", gate)  # ens_tap's second step is missing at start
    srv = ServerProcess(repo, "--model-control-mode=poll", "--repository-poll-secs=0.5").start()
    fresh_server.append(srv)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    raw = np.random.default_rng(6).integers(0, 256, (1, 256), dtype=np.uint8)
    x = np.ones(3, np.float32)
    try:
        h = httpclient.InferenceServerClient(srv.url)
        state, reason = _state(h.get_model_repository_index(), "ens_tap")
        assert state == "UNAVAILABLE" and "composing model 'gate'" in reason, (state, reason)
        shutil.move(gate, repo / "gate")
        wait_until(lambda: h.is_model_ready("ens_tap"))
        h.close()
        np.testing.assert_array_equal(_infer(client, "ens_tap", X=x).as_numpy("Y"), x)

        cls = int(_infer(client, "pipeline", RAW=raw).as_numpy("CLASS")[0, 0])
        assert 0 <= cls < 16
        v2 = repo / "postprocess" / "2"
        shutil.copytree(repo / "postprocess" / "1", v2)
        model = v2 / "model.py"
        text = model.read_text()
        assert ".reshape(-1, 1)" in text
        # a broken new version does not take the serving one down
        model.write_text(text.replace(".reshape(-1, 1)", ".reshape(-1, 1) +* 100"))
        srv.wait_log(r"model 'postprocess' version 2 failed to load")
        time.sleep(0.2)
        assert int(_infer(client, "pipeline", RAW=raw).as_numpy("CLASS")[0, 0]) == cls
        model.write_text(text.replace(".reshape(-1, 1)", ".reshape(-1, 1) + 100"))
        wait_until(lambda: int(_infer(client, "pipeline", RAW=raw).as_numpy("CLASS")[0, 0]) == cls + 100)
    finally:
        client.close()
    assert srv.terminate() == 0
    assert not srv.segments()
