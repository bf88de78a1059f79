"""The PyTorch (TorchScript) backend through the real server, on the CPU: inputs by argument
name and by the <name>__<index> convention, tuple and dict outputs, dynamic batching, a
PyTorch step inside an ensemble with a Python model, and a broken model file. Skipped
without PyTorch (.ci/run installs the CPU build where its wheel is on disk); the GPU cases
are in tests/gpu/test_pytorch_gpu.py."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Dict, Tuple  # noqa: UP035 - TorchScript's spelling

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from tests.e2e.server import ServerProcess, make_repository  # noqa: E402


class AddSub(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, INPUT0: torch.Tensor, INPUT1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
        return INPUT0 + INPUT1, INPUT0 - INPUT1


class Double(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class DictOut(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # noqa: UP006
        return {"doubled": x * 2, "negated": -x}


def save_model(repo: Path, name: str, module: Any, config: str) -> None:
    """A TorchScript ``model.pt`` of ``module`` and its configuration in ``repo``."""
    (repo / name / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in new PyTorch
        torch.jit.save(torch.jit.script(module), str(repo / name / "1" / "model.pt"))
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "pytorch"\n{config}')


DOUBLE = """max_batch_size: 0
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_GPU, count: 1, gpus: [ 0 ] } ]"""

ENSEMBLE = """name: "pt_ens" platform: "ensemble" max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
ensemble_scheduling { step [
  { model_name: "pt_double", model_version: -1, input_map { key: "INPUT__0" value: "X" },
    output_map { key: "OUTPUT__0" value: "d" } },
  { model_name: "slow", model_version: -1, input_map { key: "INPUT0" value: "d" },
    output_map { key: "OUTPUT0" value: "Y" } } ] }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "slow")
    save_model(repo, "pt_add_sub", AddSub(), """max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "INPUT1", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 4 ] },
         { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
instance_group [ { kind: KIND_CPU, count: 1 } ]""")  # fmt: skip
    save_model(repo, "pt_double", Double(), DOUBLE.replace("KIND_GPU, count: 1, gpus: [ 0 ]", "KIND_CPU"))
    (repo / "pt_ens" / "1").mkdir(parents=True)
    (repo / "pt_ens" / "config.pbtxt").write_text(ENSEMBLE)
    save_model(repo, "pt_dict", DictOut(), """max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "doubled", data_type: TYPE_FP32, dims: [ -1 ] },
         { name: "negated", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]""")  # fmt: skip
    (repo / "pt_broken" / "1").mkdir(parents=True)
    (repo / "pt_broken" / "1" / "model.pt").write_bytes(b"not a TorchScript archive")
    (repo / "pt_broken" / "config.pbtxt").write_text(
        'name: "pt_broken"\nbackend: "pytorch"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_inputs_by_argument_name_and_tuple_outputs(server: ServerProcess, proto: str) -> None:
    mod: Any = httpclient if proto == "http" else grpcclient
    client = mod.InferenceServerClient(server.url if proto == "http" else server.grpc_url)
    try:
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.ones((2, 4), np.float32)
        inputs = [mod.InferInput("INPUT0", [2, 4], "FP32"), mod.InferInput("INPUT1", [2, 4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        r = client.infer("pt_add_sub", inputs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), a - b)
    finally:
        client.close()


def test_dynamic_batching_on_cpu(server: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(server.url)
    before = h.get_inference_statistics("pt_add_sub")["model_stats"][0]
    errors: list[Any] = []

    def one(k: int) -> None:
        g = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            a = np.full((1, 4), k, np.float32)
            inputs = [grpcclient.InferInput("INPUT0", [1, 4], "FP32"), grpcclient.InferInput("INPUT1", [1, 4], "FP32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(a)
            if not np.array_equal(g.infer("pt_add_sub", inputs).as_numpy("OUTPUT__0"), 2 * a):
                errors.append(k)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            g.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = h.get_inference_statistics("pt_add_sub")["model_stats"][0]
    h.close()
    assert not errors, errors
    assert after["inference_count"] - before["inference_count"] == 8
    assert after["execution_count"] - before["execution_count"] < 8


def test_index_convention_inside_an_ensemble(server: ServerProcess) -> None:
    """pt_double (INPUT__0 / OUTPUT__0) alone, then as the first step of an ensemble whose
    second step is a Python model; 1 MiB, so the step output goes through shared memory."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = np.random.default_rng(4).random(1 << 18, dtype=np.float32)
        for model, name_in, name_out in (("pt_double", "INPUT__0", "OUTPUT__0"), ("pt_ens", "X", "Y")):
            i = grpcclient.InferInput(name_in, [x.size], "FP32")
            i.set_data_from_numpy(x)
            np.testing.assert_array_equal(client.infer(model, [i]).as_numpy(name_out), 2 * x)
    finally:
        client.close()


def test_dict_outputs_and_a_broken_model(server: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(server.url)
    try:
        x = np.array([1, -2, 3], np.float32)
        i = httpclient.InferInput("x", [3], "FP32")
        i.set_data_from_numpy(x)
        r = h.infer("pt_dict", [i])
        np.testing.assert_array_equal(r.as_numpy("doubled"), 2 * x)
        np.testing.assert_array_equal(r.as_numpy("negated"), -x)
        index = {e["name"]: e for e in h.get_model_repository_index()}
        assert index["pt_broken"]["state"] == "UNAVAILABLE"
        assert "cannot load TorchScript file 'pt_broken/1/model.pt'" in index["pt_broken"]["reason"], index["pt_broken"]
    finally:
        h.close()
