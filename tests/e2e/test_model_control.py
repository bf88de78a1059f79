"""Model management through the real server: explicit load / unload over HTTP and gRPC
(config overrides, failures that keep the old version serving, traversal attempts), the
repository index, control switched off, and poll mode following a repository that
changes while traffic runs."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until
from tests.e2e.traffic import client_for, identity_call, run_for, worker_alive


def post(server: ServerProcess, path: str, body: Any = b"") -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.url, timeout=60)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=raw)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def identity(client: Any, n: int = 4, model: str = "identity_fp32") -> np.ndarray:
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inp = mod.InferInput("INPUT0", [n], "FP32")
    inp.set_data_from_numpy(np.arange(n, dtype=np.float32))
    return client.infer(model, [inp]).as_numpy("OUTPUT0")


class Traffic:
    """Requests in a loop on another thread (raw HTTP); counts failures."""

    def __init__(self, server: ServerProcess, model: str) -> None:
        self.server, self.model = server, model
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}).encode()
        while not self._stop.is_set():
            status, reply = post(self.server, f"/v2/models/{self.model}/infer", body)
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{status} {reply}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture
def explicit(tmp_path: Path, fresh_server: list[ServerProcess]) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path / "repo", "add_sub", "identity_fp32", "strings")
    srv = ServerProcess(repo, "--model-control-mode=explicit", "--load-model", "add_sub").start()
    fresh_server.append(srv)
    yield srv
    assert srv.terminate() == 0, srv.log


def test_explicit_load_unload(explicit: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(explicit.url)
    g = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        index = {e["name"]: e for e in h.get_model_repository_index()}
        assert index["add_sub"] == {"name": "add_sub", "version": "1", "state": "READY"}
        assert index["identity_fp32"] == {"name": "identity_fp32"}  # never loaded
        assert h.is_server_ready()  # only loaded models count in explicit mode
        assert not h.is_model_ready("identity_fp32")
        h.load_model("identity_fp32")
        assert h.is_model_ready("identity_fp32")
        np.testing.assert_array_equal(identity(g), np.arange(4, dtype=np.float32))
        ready = [e.name for e in g.get_model_repository_index().models if e.state == "READY"]
        assert ready == ["add_sub", "identity_fp32"]
        status, body = post(explicit, "/v2/repository/index", {"ready": True})
        assert status == 200 and [e["name"] for e in body] == ["add_sub", "identity_fp32"]
        g.unload_model("identity_fp32")
        assert not h.is_model_ready("identity_fp32")
        with pytest.raises(InferenceServerException):
            identity(h)
        entry = next(e for e in h.get_model_repository_index() if e["name"] == "identity_fp32")
        assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
        assert h.is_server_ready()
        g.load_model("identity_fp32")  # loads again after an unload
        np.testing.assert_array_equal(identity(h), np.arange(4, dtype=np.float32))
        h.unload_model("identity_fp32", unload_dependents=True)
    finally:
        h.close()
        g.close()


def test_unloading_a_model_while_its_worker_restarts(explicit: ServerProcess) -> None:
    """A worker is killed and, while its replacement starts, the model is unloaded (five
    times, at different points of the start): the unload stops the new process and says so
    at INFO. It was logged as an ERROR "restart failed", and now and then asyncio logged the
    start's handshake future as an exception never retrieved."""
    c = explicit.client()
    for k in range(5):
        [pid] = explicit.children("shoal.workers")
        restarts = explicit.log.count("restarting in")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda n=restarts: explicit.log.count("restarting in") > n, timeout_s=10)  # type: ignore[misc]
        time.sleep(0.15 + 0.05 * k)  # its backoff is 0.1 s: the new process connects or loads
        c.unload_model("add_sub")
        c.load_model("add_sub")
        assert c.is_model_ready("add_sub")
    assert explicit.log.count("died: killed by signal SIGKILL") == 5
    assert "restart failed" not in explicit.log, explicit.log
    assert "never retrieved" not in explicit.log, explicit.log


def test_unloading_a_model_that_is_not_loaded_succeeds(explicit: ServerProcess) -> None:
    """As Triton: unloading a model never loaded, or not in the repository at all, is a
    success that changes nothing (so a deployment script's "unload, then load" can run
    twice), over HTTP and gRPC."""
    h = httpclient.InferenceServerClient(explicit.url)
    g = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        before = h.get_model_repository_index()
        for name in ("identity_fp32", "not_in_the_repository"):
            h.unload_model(name)
            g.unload_model(name)
            h.unload_model(name, unload_dependents=True)
            status, body = post(explicit, f"/v2/repository/models/{name}/unload")
            assert status == 200, body
        assert h.get_model_repository_index() == before
        assert h.is_model_ready("add_sub") and not h.is_model_ready("identity_fp32")
        status, body = post(explicit, "/v2/repository/models/..%2Fadd_sub/unload")
        assert status == 400 and "path traversal" in body["error"], body  # names are still checked
    finally:
        h.close()
        g.close()


def test_config_override_and_reload(explicit: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(explicit.url)
    try:
        h.load_model("identity_fp32")
        before = explicit.worker_pids("identity_fp32")
        cfg = h.get_model_config("identity_fp32")
        cfg["instance_group"] = [{"kind": "KIND_CPU", "count": 2}]
        with Traffic(explicit, "identity_fp32") as traffic:
            time.sleep(0.2)
            h.load_model("identity_fp32", config=json.dumps(cfg))
            time.sleep(0.2)
        assert not traffic.failures, traffic.failures[:3]
        assert traffic.ok > 0
        # two new workers started (the log is read on another thread: wait for it)
        wait_until(lambda: len(explicit.worker_pids("identity_fp32")) >= len(before) + 2)
        after = explicit.worker_pids("identity_fp32")
        assert [g["count"] for g in h.get_model_config("identity_fp32")["instance_group"]] == [2]
        # loading again without changes restarts nothing
        h.load_model("identity_fp32", config=json.dumps(cfg))
        time.sleep(0.3)
        assert explicit.worker_pids("identity_fp32") == after
        bad_configs = [
            ("{not json", "failed to poll from model repository: Invalid config override"),
            (json.dumps({"name": "identity_fp32", "no_such_field": 1}), "invalid model configuration"),
            # Triton's text (the reason is in the log and the repository index)
            (
                json.dumps({**cfg, "name": "other"}),
                "failed to load 'identity_fp32', failed to poll from model repository",
            ),
        ]
        for text, message in bad_configs:
            with pytest.raises(InferenceServerException, match=message):
                h.load_model("identity_fp32", config=text)
            np.testing.assert_array_equal(identity(h), np.arange(4, dtype=np.float32))  # still serving
    finally:
        h.close()


def test_failed_reload_keeps_the_old_version(explicit: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(explicit.url)
    try:
        model_py = explicit.repository / "add_sub" / "1" / "model.py"
        good = model_py.read_text()
        model_py.write_text("raise RuntimeError('broken on purpose')\n")
        try:
            with pytest.raises(InferenceServerException, match="broken on purpose"):
                h.load_model("add_sub")
            assert h.is_model_ready("add_sub")
            entry = next(e for e in h.get_model_repository_index() if e["name"] == "add_sub")
            assert entry["state"] == "READY" and "reload failed" in entry["reason"]
        finally:
            model_py.write_text(good)
        a = httpclient.InferInput("INPUT0", [4], "FP32")
        a.set_data_from_numpy(np.ones(4, dtype=np.float32))
        b = httpclient.InferInput("INPUT1", [4], "FP32")
        b.set_data_from_numpy(np.ones(4, dtype=np.float32))
        assert h.infer("add_sub", [a, b]).as_numpy("OUTPUT0").tolist() == [2, 2, 2, 2]
        h.load_model("add_sub")  # fixed: reloads, and the reason is gone
        entry = next(e for e in h.get_model_repository_index() if e["name"] == "add_sub")
        assert entry == {"name": "add_sub", "version": "1", "state": "READY"}
    finally:
        h.close()


def test_names_never_leave_the_repository(explicit: ServerProcess, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(explicit.repository / "identity_fp32", outside)
    g = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        for name in ("../outside", "..", ".", "/etc", "a/b", "identity_fp32/..", "", "x\x00y", "no_such_model"):
            with pytest.raises(InferenceServerException) as err:
                g.load_model(name)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (name, err.value)
    finally:
        g.close()
    for path in ("/v2/repository/models/..%2Foutside/load", "/v2/repository/models/%2E%2E/load"):
        status, _ = post(explicit, path, {})
        assert status in (400, 404), path
    status, reply = post(
        explicit, "/v2/repository/models/identity_fp32/load", {"parameters": {"file:1/model.py": "eA=="}}
    )
    assert status == 400 and reply["error"] == "Load parameter 'config' must be specified for model file override"
    status, reply = post(explicit, "/v2/repository/models/identity_fp32/load", {"parameters": {"weird": "1"}})
    assert status == 400 and reply["error"] == "Unrecognized load parameter 'weird' with type 'STRING'"
    status, reply = post(explicit, "/v2/repository/index", {"ready": "yes"})
    assert status == 400


def test_control_switched_off(server: ServerProcess) -> None:
    """The shared default server runs --model-control-mode=none: index works, load and
    unload answer 503 (HTTP) / UNAVAILABLE (gRPC)."""
    status, index = post(server, "/v2/repository/index")
    assert status == 200 and {"name": "add_sub", "version": "1", "state": "READY"} in index
    for action in ("load", "unload"):
        status, reply = post(server, f"/v2/repository/models/add_sub/{action}", {})
        assert (status, reply["error"]) == (503, "explicit model load / unload is not allowed if polling is enabled")
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            g.unload_model("add_sub")
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        g.close()


def _index(h: httpclient.InferenceServerClient) -> dict[tuple[str, str], dict[str, str]]:
    return {(e["name"], e.get("version", "")): e for e in h.get_model_repository_index()}


def test_poll_mode(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "identity_fp32", "add_sub")
    spare = make_repository(tmp_path / "spare", "strings")
    srv = ServerProcess(repo, "--model-control-mode=poll", "--repository-poll-secs=0.3").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        with Traffic(srv, "identity_fp32") as traffic:
            # a new model appears
            shutil.copytree(spare / "strings", repo / "strings")
            wait_until(lambda: h.is_model_ready("strings"))
            # a new version: the default policy (latest 1) serves 2 and retires 1
            shutil.copytree(repo / "identity_fp32" / "1", repo / "identity_fp32" / "2")
            wait_until(lambda: h.is_model_ready("identity_fp32", "2") and not h.is_model_ready("identity_fp32", "1"))
            # a changed config
            cfg = repo / "identity_fp32" / "config.pbtxt"
            text = cfg.read_text()
            cfg.write_text(text.replace("count: 1", "count: 2"))
            wait_until(lambda: len(srv.worker_pids("identity_fp32")) >= 4)
            # a broken config: the running version keeps serving, the index says why
            cfg.write_text("this is { not a config")
            wait_until(lambda: "reload failed" in _index(h).get(("identity_fp32", "2"), {}).get("reason", ""))
            assert h.is_model_ready("identity_fp32", "2")
            cfg.write_text(text)
            wait_until(lambda: "reason" not in _index(h).get(("identity_fp32", "2"), {"reason": ""}))
            time.sleep(0.3)
        assert not traffic.failures, traffic.failures[:3]
        assert traffic.ok > 0
        # a removed model is unloaded
        shutil.rmtree(repo / "add_sub")
        wait_until(lambda: not h.is_model_ready("add_sub"))
        assert h.is_server_ready()
        os.sync()
    finally:
        h.close()
    assert srv.terminate() == 0


UPLOADED_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x * 10).astype(np.float32))]))
        return out
"""


def test_model_files_sent_with_load(explicit: ServerProcess) -> None:
    """Triton's file override: the files of the load request are the model, in a directory
    of their own, until a load without files goes back to the repository."""
    h = httpclient.InferenceServerClient(explicit.url)
    g = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        h.load_model("identity_fp32")
        cfg = json.dumps(h.get_model_config("identity_fp32"))
        h.load_model("identity_fp32", config=cfg, files={"file:1/model.py": UPLOADED_MODEL.encode()})
        np.testing.assert_array_equal(identity(h), np.arange(4, dtype=np.float32) * 10)
        # the repository's own files are untouched
        assert "x * 10" not in (explicit.repository / "identity_fp32" / "1" / "model.py").read_text()
        h.load_model("identity_fp32")  # no files: the repository's model again
        np.testing.assert_array_equal(identity(h), np.arange(4, dtype=np.float32))
        # a model that is not in the repository at all, over gRPC
        g.load_model("uploaded", config=cfg.replace("identity_fp32", "uploaded"),
                     files={"file:1/model.py": UPLOADED_MODEL.encode()})  # fmt: skip
        np.testing.assert_array_equal(identity(g, model="uploaded"), np.arange(4, dtype=np.float32) * 10)
        g.unload_model("uploaded")
        uploads = list(Path(explicit.run_dir()).glob("uploads/*"))
        assert uploads == [], uploads  # given back after the reload and the unload
        for files, status in (({"file:../escape.py": b"x"}, "StatusCode.INVALID_ARGUMENT"),
                              ({"file:" + "A" * 300: b"x"}, "StatusCode.INTERNAL")):  # fmt: skip
            with pytest.raises(InferenceServerException) as err:
                g.load_model("identity_fp32", config=cfg, files=files)
            assert err.value.status() == status, err.value
        assert g.is_server_live()
        np.testing.assert_array_equal(identity(h), np.arange(4, dtype=np.float32))
    finally:
        h.close()
        g.close()


def test_load_unload_churn_under_traffic(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """Four clients load and unload two models at random (HTTP and gRPC) while six infer them,
    directly and through a BLS model, for 6 s. Every control call succeeds (an unload of a
    model not loaded too, as in Triton); every request is answered right or refused as a
    model that is not there; afterwards the models load and serve, and once unloaded none of
    their workers is left, nothing is logged as an error and no segment stays."""
    repo = make_repository(tmp_path / "repo", "identity_fp32", "slow", "bls_relay")
    srv = ServerProcess(repo, "--model-control-mode=explicit", "--load-model", "bls_relay").start()
    fresh_server.append(srv)
    models = ("identity_fp32", "slow")
    stop = threading.Event()
    control_failures: list[str] = []
    odd: list[str] = []
    answered = [0]

    def control(k: int) -> None:
        rng = np.random.default_rng(k)
        c = client_for(srv, k)
        try:
            while not stop.is_set():
                name = models[rng.integers(2)]
                try:
                    (c.unload_model if rng.random() < 0.4 else c.load_model)(name)
                except InferenceServerException as exc:
                    control_failures.append(f"{name}: {exc}")
                time.sleep(rng.random() * 0.05)
        finally:
            c.close()

    def traffic(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        c = client_for(srv, k)
        try:
            while not stop.is_set():
                name = models[rng.integers(2)]
                try:
                    identity_call(c, name, np.arange(4, dtype=np.float32) + k, rng.random() < 0.5)
                    answered[0] += 1
                except InferenceServerException as exc:
                    if f"Request for unknown model: '{name}'" not in str(exc):
                        odd.append(str(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=control, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=traffic, args=(k,)) for k in range(6)]
    run_for(6, stop, threads)
    assert not control_failures, control_failures[:5]
    assert not odd, odd[:5]
    assert answered[0] > 0
    h = httpclient.InferenceServerClient(srv.url)
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        for name in models:
            h.load_model(name)
            np.testing.assert_array_equal(identity(g, model=name), np.arange(4, dtype=np.float32))
            h.unload_model(name)
        wait_until(lambda: not [p for name in models for p in srv.worker_pids(name) if worker_alive(p)], timeout_s=30)
    finally:
        h.close()
        g.close()
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()
    for bad in ("Traceback", " ERROR ", "Task exception"):
        assert bad not in srv.log, srv.log
