"""tritonserver's command line through the real server: the ``tritonserver`` executable with
Triton's defaults, services switched off, the TRTIS health port, the log flags, several
repositories, custom config names, load retries, backend settings, forwarded headers,
TLS on gRPC and ignored options."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import PLANTED
from tests.e2e.server import ServerProcess, make_repository

PARAMS_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            t = pb_utils.Tensor("PARAMS", np.array([r.parameters().encode()], dtype=np.object_))
            out.append(pb_utils.InferenceResponse([t]))
        return out
"""
PARAMS_CONFIG = """
backend: "python"
max_batch_size: 0
input [{ name: "IN", data_type: TYPE_INT32, dims: [1] }]
output [{ name: "PARAMS", data_type: TYPE_STRING, dims: [1] }]
"""

# fails its first load, then succeeds: it leaves a marker next to itself
FLAKY_MODEL = """
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        marker = os.path.join(os.path.dirname(__file__), "tried")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first load fails on purpose")

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PARAMS", np.array([b"ok"], dtype=np.object_))])
                for _ in requests]
"""


def _python_model(repo: Path, name: str, source: str = PARAMS_MODEL, config: str = PARAMS_CONFIG) -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(source))
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name


def _start(started: list[ServerProcess], repo: Path, *args: str, triton: bool = False) -> ServerProcess:
    srv = ServerProcess(repo, *args, triton=triton)
    started.append(srv)
    return srv.start()


def _params_http(srv: ServerProcess, headers: dict[str, str] | None = None) -> dict[str, object]:
    inp = httpclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    res = srv.client().infer("params", [inp], headers=headers)
    return json.loads(res.as_numpy("PARAMS")[0])


def test_tritonserver_has_triton_defaults(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    srv = _start(fresh_server, repo, triton=True)
    assert srv.client().get_server_metadata()["name"] == "triton"
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    assert g.get_server_metadata().name == "triton"
    g.close()
    assert srv.terminate() == 0


def test_tritonserver_exits_when_a_model_fails_to_load(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    _python_model(repo, "broken", "raise ImportError('no such thing')\n")
    srv = ServerProcess(repo, triton=True)
    fresh_server.append(srv)
    try:
        srv.start(timeout_s=60)
    except RuntimeError:
        pass  # it may be gone before its start-up line is read
    assert srv.proc is not None and srv.proc.wait(30) == 1
    assert "error: creating server: Internal - failed to load all models" in srv.log
    assert not srv.segments()
    # --exit-on-error=false: serve what loaded (shoal serve's default)
    srv = _start(fresh_server, repo, "--exit-on-error=false", triton=True)
    assert srv.client().is_model_ready("params") and not srv.client().is_server_ready()
    assert srv.terminate() == 0


def test_services_switched_off(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    srv = _start(fresh_server, repo, "--allow-http=false", "--allow-metrics", "false")
    assert srv.port == 0 and srv.metrics_port == 0 and "HTTP listening" not in srv.log
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    assert g.is_server_ready()
    g.close()
    assert srv.terminate() == 0
    srv = _start(fresh_server, repo, "--allow-grpc", "0")
    assert srv.grpc_port == 0 and "GRPC listening" not in srv.log
    assert srv.client().is_server_ready()
    assert srv.terminate() == 0


def test_health_port(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    srv = _start(fresh_server, repo, "--http-health-port", "0")
    base = f"http://127.0.0.1:{srv.health_port}"
    assert srv.health_port and srv.health_port != srv.port
    assert requests.get(base + "/v2/health/live", timeout=10).status_code == 200
    assert requests.get(base + "/v2/health/ready", timeout=10).status_code == 200
    # health alone: no inference, no metadata
    assert requests.get(base + "/v2", timeout=10).status_code == 404
    assert requests.post(base + "/v2/models/params/infer", json={}, timeout=10).status_code in (404, 405)
    assert srv.terminate() == 0


@pytest.mark.exclusive  # plants a dead run's segment, which another test's server start would reclaim
def test_log_file_and_levels(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    log_file = tmp_path / "server.log"
    # a dead run's segment: the start's first line is the warning that it was removed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path("/dev/shm", f"shoal_{dead.pid}_{PLANTED}_in_0")
    stale.write_bytes(b"x" * 100)
    cmd = [sys.executable, "-m", "shoal.server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1"]
    cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--allow-cpu-metrics", "false"]
    proc = subprocess.Popen([*cmd, "--log-file", str(log_file), "--log-format", "ISO8601"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "shoal: server " not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the server never logged its start"
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        stale.unlink(missing_ok=True)
    assert proc.stderr is not None and proc.stderr.read() == b""  # everything went to the file
    proc.stderr.close()
    text = log_file.read_text()
    assert "HTTP listening on" in text and "model 'params' version 1 instance" in text
    lines = text.splitlines()
    assert "left by a server that is gone" in lines[0], lines[0]
    # ISO8601 timestamps on every line, the first included: 2026-11-30T12:00:00+0000
    for line in lines:
        assert line[4] == "-" and line[10] == "T", line
    srv = _start(fresh_server, repo, "--log-warning=false", "--log-verbose", "0")
    settings = srv.client().get_log_settings()
    assert settings["log_warning"] is False and settings["log_info"] is True and settings["log_format"] == "default"
    assert srv.terminate() == 0


def test_several_repositories(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _python_model(a, "params")
    _python_model(b, "other")
    _python_model(b, "both")
    _python_model(a, "both")
    srv = _start(fresh_server, a, "--model-repository", str(b))
    c = srv.client()
    assert c.is_model_ready("params") and c.is_model_ready("other")
    assert not c.is_model_ready("both")
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert set(index) == {"params", "other", "both"}
    assert "a model name must be unique" in index["both"]["reason"]
    inp = httpclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    assert c.infer("other", [inp]).as_numpy("PARAMS")[0] in (b"{}", b"")
    assert srv.terminate() == 0


def test_model_config_name_and_load_retries(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    model = _python_model(repo, "params")
    (model / "configs").mkdir()
    (model / "configs" / "alt.pbtxt").write_text(PARAMS_CONFIG.replace('"IN"', '"ALT_IN"'))
    _python_model(repo, "flaky", FLAKY_MODEL)
    srv = _start(fresh_server, repo, "--model-config-name", "alt", "--model-load-retry-count", "1")
    c = srv.client()
    assert [i["name"] for i in c.get_model_metadata("params")["inputs"]] == ["ALT_IN"]
    assert c.is_model_ready("flaky"), srv.log
    assert "model 'flaky': load failed; retrying (1 of 1)" in srv.log
    assert srv.terminate() == 0


def test_header_forwarding(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    srv = _start(
        fresh_server, repo, "--http-header-forward-pattern", "^x-fwd-", "--grpc-header-forward-pattern", "tenant"
    )
    got = _params_http(srv, {"X-Fwd-User": "alice", "X-Other": "no"})
    assert {k.lower(): v for k, v in got.items()} == {"x-fwd-user": "alice"}
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    res = g.infer("params", [inp], headers={"my-tenant": "blue", "x-fwd-user": "bob"})
    assert json.loads(res.as_numpy("PARAMS")[0]) == {"my-tenant": "blue"}
    g.close()
    assert srv.terminate() == 0


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "server.key", tmp / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_grpc_tls(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    repo = tmp_path / "repo"
    _python_model(repo, "params")
    key, cert = _self_signed(tmp_path)
    srv = _start(
        fresh_server, repo, "--grpc-use-ssl=true", "--grpc-server-cert", str(cert), "--grpc-server-key", str(key)
    )
    url = f"localhost:{srv.grpc_port}"
    g = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))
    assert g.is_server_live() and g.get_server_metadata().name == "shoal"
    g.close()
    plain = grpcclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    plain.close()
    assert srv.terminate() == 0


def test_ignored_and_deprecated_options_warn(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo")
    srv = _start(
        fresh_server,
        repo,
        "--backend-directory=/opt/tritonserver/backends",
        "--pinned-memory-pool-byte-size=268435456",
        "--cuda-memory-pool-byte-size=0:67108864",
        "--http-thread-count=8",
        "--strict-model-config=false",
    )
    assert (
        "ignored (no meaning in Shoal): --http-thread-count, --backend-directory, "
        "--pinned-memory-pool-byte-size, --cuda-memory-pool-byte-size" in srv.log
    )
    assert "--strict-model-config is deprecated: use --disable-auto-complete-config" in srv.log
    assert srv.terminate() == 0


def test_bad_command_lines_name_the_option(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal.server.tritonserver", "--model-repository", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args, text in (
        (("--log-format", "json"), "--log-format 'json': expected default or ISO8601"),
        (("--grpc-use-ssl=true",), "--grpc-use-ssl needs --grpc-server-cert"),
        (("--backend-config", "onnxruntime"), "--backend-config 'onnxruntime': expected [<group>,]<key>=<value>"),
        (("--cache-config", "redis,host=x"), "cache 'redis' is not available"),
        (("--rate-limit", "always"), "--rate-limit 'always': expected off or execution_count"),
        (("--allow-http", "maybe"), "--allow-http 'maybe': expected true or false"),
        (("--http-header-forward-pattern", "("), "--http-header-forward-pattern '(': not a regular expression"),
        (("--host-policy", "gpu_0"), "--host-policy option format is '<policy name>,<setting>=<value>'. Got gpu_0"),
        (
            ("--host-policy", "cpu,cores=1"),
            "Unsupported host policy setting 'cores' is specified, supported settings are 'numa-node', 'cpu-cores'",
        ),
        (
            ("--host-policy", "cpu,cpu-cores=3"),
            "host policy setting 'cpu-cores' format is '<lower_cpu_core_id>-<upper_cpu_core_id>'. Got 3",
        ),
        (("--host-policy", "cpu,numa-node=one"), "Parsing 'numa-node' value: Can't parse 'one' to integer"),
        (
            ("--model-load-gpu-limit", "0.5"),
            "Cannot parse pair option due to incorrect number of inputs.--<pair option> argument requires format "
            "<first>:<second>. Found: 0.5",
        ),
        (("--model-load-gpu-limit", "gpu0:0.5"), "Invalid option value. Got gpu0"),
        (("--model-load-gpu-limit", "0:half"), "Invalid option value. Got half"),
    ):
        out = run(*args)
        assert out.returncode == 2 and text in out.stderr, (args, out.stderr)
        assert out.stderr.startswith("tritonserver: invalid command line:")
        assert "Traceback" not in out.stderr
    helped = run("--help")
    assert helped.returncode == 0
    for group in ("Server:", "Logging:", "Model Repository:", "HTTP:", "GRPC:", "Metrics:", "Tracing:", "Backend:"):
        assert group in helped.stdout
    flat = " ".join(helped.stdout.split())
    assert "--grpc-use-ssl-mutual" in flat and "--id STR the server's name in server metadata (default: triton)" in flat


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("form", ["::1", "[::1]"])
def test_ipv6_addresses_with_or_without_brackets(tmp_path: Path, fresh_server: list[ServerProcess], form: str) -> None:
    """``--http-address``, ``--grpc-address`` and ``--metrics-address`` take an IPv6 address
    bare or in brackets; gRPC used to fail to start with a bare one (its address parser read
    "::1:8001" as a name), HTTP with a bracketed one."""
    repo = make_repository(tmp_path / "repo", "add_sub")
    srv = _start(fresh_server, repo, "--http-address", form, "--grpc-address", form, "--metrics-address", form)
    assert requests.get(f"http://[::1]:{srv.port}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"http://[::1]:{srv.metrics_port}/metrics", timeout=10).status_code == 200
    c = grpcclient.InferenceServerClient(f"[::1]:{srv.grpc_port}")
    try:
        assert c.is_server_ready()
    finally:
        c.close()
    with pytest.raises(requests.ConnectionError):  # bound to ::1 only
        requests.get(f"http://127.0.0.1:{srv.port}/v2/health/ready", timeout=10)
