"""python_backend's custom execution environments (``EXECUTION_ENV_PATH``) through the real
server: a model whose package lives only in a conda-pack style archive next to it
(``$$TRITON_MODEL_DIRECTORY/env.tar.gz``) imports it from there, so does one naming an
unpacked environment's activation script; an archive for another Python fails the load
naming both versions. The archives are built here; they unpack under the test's folder."""

from __future__ import annotations

import io
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.timeout(120)
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_INT32, dims: [ 1 ] }} ]
parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{env}" }} }}
instance_group [ {{ kind: KIND_CPU, count: 2 }} ]
"""
MODEL = """import numpy as np
import shoal_env_probe  # only in the model's execution environment
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + shoal_env_probe.VALUE)]))
        return out
"""


def _archive(path: Path, python: str, value: int) -> None:
    """A conda-pack style archive: lib/<python>/site-packages/shoal_env_probe."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (
            (f"lib/{python}/site-packages/shoal_env_probe/__init__.py", f"VALUE = {value}\n"),
            ("bin/activate", "# activation script\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _model(repo: Path, name: str, env: str) -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, env=env))
    (repo / name / "1" / "model.py").write_text(MODEL)
    return repo / name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("envs")
    repo = tmp / "repo"
    _archive(_model(repo, "packed", "$$TRITON_MODEL_DIRECTORY/env.tar.gz") / "env.tar.gz", PY, 40)
    unpacked = tmp / "unpacked_env"
    _archive(tmp / "u.tar.gz", PY, 7)
    with tarfile.open(tmp / "u.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    _model(repo, "unpacked", str(unpacked / "bin" / "activate"))
    _archive(_model(repo, "other_python", "$$TRITON_MODEL_DIRECTORY/env.tar.gz") / "env.tar.gz", "python2.7", 1)
    srv = ServerProcess(repo, env={"SHOAL_ENV_CACHE": str(tmp / "cache")}).start(wait_ready=False)
    try:
        yield srv
    finally:
        srv.terminate()


def _infer(server: ServerProcess, model: str) -> int:
    c = httpclient.InferenceServerClient(server.url)
    try:
        x = httpclient.InferInput("X", [1], "INT32")
        x.set_data_from_numpy(np.array([2], np.int32))
        return int(c.infer(model, [x]).as_numpy("Y")[0])
    finally:
        c.close()


def _wait_ready(server: ServerProcess, model: str) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        deadline = time.monotonic() + 60
        while not c.is_model_ready(model):
            assert time.monotonic() < deadline, f"{model} not ready"
            time.sleep(0.1)
    finally:
        c.close()


def test_a_model_imports_its_package_from_its_archive(server: ServerProcess) -> None:
    _wait_ready(server, "packed")
    assert _infer(server, "packed") == 42  # both instances unpacked or reused one copy
    assert _infer(server, "packed") == 42


def test_a_model_names_an_unpacked_environments_activation_script(server: ServerProcess) -> None:
    _wait_ready(server, "unpacked")
    assert _infer(server, "unpacked") == 9


def test_an_environment_for_another_python_fails_the_load_naming_both(server: ServerProcess) -> None:
    # its load fails once its worker has started and read the archive: wait for the end of
    # the load (other models being ready says nothing about this one's on a loaded machine)
    c = httpclient.InferenceServerClient(server.url)
    try:
        deadline = time.monotonic() + 60
        while (entry := {m["name"]: m for m in c.get_model_repository_index()}["other_python"])["state"] == "LOADING":
            assert time.monotonic() < deadline, "other_python is still loading"
            time.sleep(0.1)
    finally:
        c.close()
    assert entry["state"] == "UNAVAILABLE"
    assert f"has no packages for {PY} (it has: python2.7)" in entry["reason"]
