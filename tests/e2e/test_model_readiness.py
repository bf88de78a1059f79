"""A Python model's own readiness check (python_backend's ``is_ready``, here ``async def``)
through the real server: model readiness over HTTP and gRPC and strict server readiness
follow it; a check that raises, answers something else than a bool or takes longer than
5 s means "not ready"; a model without one is ready without being asked."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("readiness", "add_sub"))


def _get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{server.url}{path}", timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _set_mode(server: ServerProcess, mode: int) -> int:
    """Sets what the model's is_ready does next; returns how many checks it ran so far."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        x = httpclient.InferInput("MODE", [1], "INT32")
        x.set_data_from_numpy(np.array([mode], np.int32))
        return int(c.infer("readiness", [x]).as_numpy("OUT")[0])
    finally:
        c.close()


def _ready(server: ServerProcess) -> tuple[bool, bool, bool]:
    """(HTTP model ready, gRPC model ready, HTTP server ready)."""
    h = httpclient.InferenceServerClient(server.url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return h.is_model_ready("readiness"), g.is_model_ready("readiness"), h.is_server_ready()
    finally:
        h.close()
        g.close()


def test_readiness_follows_the_models_is_ready(server: ServerProcess) -> None:
    before = _set_mode(server, 0)
    assert _ready(server) == (True, True, True)
    _set_mode(server, 1)
    assert _ready(server) == (False, False, False)
    status, body = _get(server, "/v2/models/readiness/ready")
    assert status == 400 and json.loads(body) == {"error": "Model version not ready"}
    status, _ = _get(server, "/v2/models/add_sub/ready")
    assert status == 200  # a model without is_ready is not asked
    assert _set_mode(server, 0) - before >= 6  # the model was asked each time
    assert _ready(server) == (True, True, True)


@pytest.mark.parametrize("mode", [2, 3])
def test_a_check_that_raises_or_answers_no_bool_means_not_ready(server: ServerProcess, mode: int) -> None:
    _set_mode(server, mode)
    try:
        assert _ready(server) == (False, False, False)
    finally:
        _set_mode(server, 0)  # the instance still serves
    assert _ready(server) == (True, True, True)
    assert "is_ready() must return a boolean value" in server.log or mode == 2
    assert "the feature store is unreachable" in server.log or mode == 3


def test_a_check_with_no_answer_within_five_seconds_means_not_ready(server: ServerProcess) -> None:
    _set_mode(server, 4)
    try:
        t0 = time.monotonic()
        status, _ = _get(server, "/v2/models/readiness/ready")
        assert status == 400
        assert 4.5 < time.monotonic() - t0 < 10
    finally:
        _set_mode(server, 0)
    time.sleep(1.5)  # the late check finishes; the next one answers at once
    assert _ready(server) == (True, True, True)
