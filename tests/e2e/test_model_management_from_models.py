"""``pb_utils.load_model`` / ``unload_model`` / ``is_model_ready`` from inside a model, through
the router's model management (explicit model control)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(
        tmp_path_factory, ("manager", "add_sub"), "--model-control-mode", "explicit", "--load-model", "manager"
    )


def _act(server: ServerProcess, action: str, name: str, **params: object) -> bool:
    c = httpclient.InferenceServerClient(server.url)
    try:
        ins = []
        for key, value in (("ACTION", action), ("MODEL_NAME", name)):
            i = httpclient.InferInput(key, [1], "BYTES")
            i.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
            ins.append(i)
        return bool(c.infer("manager", ins, parameters=params or None).as_numpy("READY")[0])
    finally:
        c.close()


def test_a_model_loads_checks_and_unloads_another(server: ServerProcess) -> None:
    assert _act(server, "ready", "add_sub") is False
    assert _act(server, "load", "add_sub") is True
    c = httpclient.InferenceServerClient(server.url)
    try:
        assert c.is_model_ready("add_sub")
    finally:
        c.close()
    assert _act(server, "unload", "add_sub") is False


def test_load_with_a_config_override(server: ServerProcess) -> None:
    config = json.dumps({"name": "add_sub", "backend": "python", "max_batch_size": 0,
                         "instance_group": [{"kind": "KIND_CPU", "count": 2}],
                         "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]},
                                   {"name": "INPUT1", "data_type": "TYPE_FP32", "dims": [4]}],
                         "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]},
                                    {"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [4]}]})  # fmt: skip
    assert _act(server, "load", "add_sub", config=config) is True
    c = httpclient.InferenceServerClient(server.url)
    try:
        assert len(c.get_model_config("add_sub")["instance_group"]) == 1
        assert c.get_model_config("add_sub")["instance_group"][0]["count"] == 2
    finally:
        c.close()
    _act(server, "unload", "add_sub")


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("nope", {}, "nope"),
        ("add_sub", {"config": "{not json"}, "Invalid config override"),
        ("add_sub", {"files": {"file:1/model.py": "x"}}, "Load parameter 'config' must be specified"),
    ],
)
def test_failures_reach_the_model(server: ServerProcess, name: str, params: dict[str, object], words: str) -> None:
    with pytest.raises(InferenceServerException, match=words):
        _act(server, "load", name, **params)


def test_load_with_model_files(server: ServerProcess) -> None:
    """``files``: the model's files sent by another model (bytes through the worker's
    message), served from a directory of their own."""
    source = (server.repository / "add_sub" / "1" / "model.py").read_text()  # type: ignore[operator]
    config = json.dumps({"name": "added", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]},
                                   {"name": "INPUT1", "data_type": "TYPE_FP32", "dims": [4]}],
                         "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]},
                                    {"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [4]}]})  # fmt: skip
    assert _act(server, "load", "added", config=config, files={"file:1/model.py": source}) is True
    c = httpclient.InferenceServerClient(server.url)
    try:
        ins = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
        for i in ins:
            i.set_data_from_numpy(np.full(4, 3, dtype=np.float32))
        assert c.infer("added", ins).as_numpy("OUTPUT0").tolist() == [6, 6, 6, 6]
    finally:
        c.close()
    assert _act(server, "unload", "added") is False
