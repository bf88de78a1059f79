"""Restricted APIs (Triton's --http-restricted-api / --grpc-restricted-protocol, and the
admin API through the same mechanism)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shoal.proto.gen import health_pb2, health_pb2_grpc
from tests.e2e.server import ServerProcess
from tests.security.conftest import ADD_SUB, limited, request

KEY, VALUE = "X-Admin-Key", "s3cret"


@pytest.fixture(scope="module")
def restricted(repo: Path) -> Iterator[ServerProcess]:
    srv = limited(
        repo,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        "--http-restricted-api",
        f"model-repository,shared-memory,logging,admin,statistics:{KEY}={VALUE}",
        "--http-restricted-api",
        "inference:infer-key=infer-value",
        "--grpc-restricted-protocol",
        "model-repository,shared-memory,logging,health:admin-key=s3cret",
    ).start()
    yield srv
    assert srv.terminate() == 0


HTTP_CALLS = [
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/models/add_sub/load", b"{}"),
    ("POST", "/v2/repository/models/nope/unload", b"{}"),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/cudasharedmemory/unregister", b""),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", b'{"log_info": false}'),
    ("GET", "/v2/admin/workers", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/models/add_sub/stats", None),
]


@pytest.mark.parametrize(("method", "path", "body"), HTTP_CALLS, ids=[f"{m} {p}" for m, p, _ in HTTP_CALLS])
def test_http_restricted_groups(restricted: ServerProcess, method: str, path: str, body: bytes | None) -> None:
    code, reply = request(restricted.port, method, path, body)
    assert code == 403 and reply == {"error": f"This API is restricted, expecting header '{KEY}'"}
    code, reply = request(restricted.port, method, path, body, {KEY: "wrong"})
    assert code == 403
    code, _ = request(restricted.port, method, path, body, {KEY: VALUE})
    assert code != 403


def test_http_inference_has_its_own_key(restricted: ServerProcess) -> None:
    code, reply = request(restricted.port, "POST", "/v2/models/add_sub/infer", ADD_SUB, {KEY: VALUE})
    assert code == 403 and "'infer-key'" in reply["error"]
    assert request(restricted.port, "POST", "/v2/models/add_sub/infer", ADD_SUB, {"infer-key": "infer-value"})[0] == 200
    # unrestricted groups stay open
    for path in ("/v2/health/ready", "/v2/health/live", "/v2", "/v2/models/add_sub", "/v2/models/add_sub/config"):
        assert request(restricted.port, "GET", path)[0] == 200, path


def test_grpc_restricted_groups(restricted: ServerProcess) -> None:
    expected = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
    g = grpcclient.InferenceServerClient(restricted.grpc_url)
    try:
        calls: list[Callable[[dict[str, str] | None], object]] = [
            lambda h: g.get_model_repository_index(headers=h),
            lambda h: g.get_system_shared_memory_status(headers=h),
            lambda h: g.get_log_settings(headers=h),
            lambda h: g.is_server_ready(headers=h),
            lambda h: g.is_model_ready("add_sub", headers=h),
        ]
        for call in calls:
            with pytest.raises(InferenceServerException) as err:
                call(None)
            assert err.value.status() == "StatusCode.UNAVAILABLE" and expected in str(err.value)
            call({"triton-grpc-protocol-admin-key": "s3cret"})
        # groups without a rule stay open over gRPC (inference is only restricted over HTTP here)
        assert g.get_server_metadata().name
        i0 = grpcclient.InferInput("INPUT0", [4], "FP32")
        i0.set_data_from_numpy(np.ones(4, np.float32))
        i1 = grpcclient.InferInput("INPUT1", [4], "FP32")
        i1.set_data_from_numpy(np.ones(4, np.float32))
        assert (g.infer("add_sub", [i0, i1]).as_numpy("OUTPUT0") == 2).all()
    finally:
        g.close()
    # grpc.health.v1 is the health group too
    with grpc.insecure_channel(restricted.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as rpc_err:
            stub.Check(health_pb2.HealthCheckRequest())
        assert rpc_err.value.code() == grpc.StatusCode.UNAVAILABLE
        ok = stub.Check(health_pb2.HealthCheckRequest(), metadata=(("triton-grpc-protocol-admin-key", "s3cret"),))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING


def test_restricted_settings_are_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.e2e.server import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.server",
            "serve",
            "--model-repository",
            str(tmp_path),
            "--http-restricted-api",
            "inference,bogus:k=v",
            "--http-restricted-api",
            "inference:k2=v2",
            "--grpc-restricted-protocol",
            "health",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown restricted api 'bogus'" in proc.stderr
    assert "restricted api 'inference' can not be specified in multiple config groups" in proc.stderr
    assert "--grpc-restricted-protocol 'health': expected <protocols>:<key>=<value>" in proc.stderr


def test_logging_cannot_be_switched_off_without_the_key(restricted: ServerProcess) -> None:
    body = json.dumps({"log_info": False, "log_warning": False, "log_error": False}).encode()
    assert request(restricted.port, "POST", "/v2/logging", body)[0] == 403
    code, settings = request(restricted.port, "GET", "/v2/logging", headers={KEY: VALUE})
    assert code == 200 and settings["log_error"] is True
