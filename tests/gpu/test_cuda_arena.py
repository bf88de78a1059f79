"""The CUDA arena (``workers/cudaarena.py``): an ensemble step's output that only GPU steps
read stays in its GPU instance's device memory (a PyTorch model's output, or a Python model's
GPU tensor), and the next step's worker opens it by CUDA IPC and reads it there; the router
never touches its bytes. A Python model on the GPU (``FORCE_CPU_ONLY_INPUT_TENSORS: no``)
reports whether its input arrived in GPU memory. Blocks go back to the arena (a small arena
would fill up and send outputs through the host otherwise), and a producer that is killed
comes back with new segments that its readers open afresh. A BLS call with
``preferred_memory`` GPU gets a PyTorch GPU model's outputs in GPU memory, over a lane and
through the router. Run with ``scripts/gpu_bench`` (``GPU_TESTS``) on the device machine."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")

import tritonclient.http as httpclient  # noqa: E402

from tests.e2e.server import ServerProcess  # noqa: E402
from tests.e2e.test_pytorch import DOUBLE, Double, save_model  # noqa: E402


class AddOne(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


PROBE = """import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            on_gpu = not x.is_cpu()
            host = torch.utils.dlpack.from_dlpack(x.to_dlpack()).cpu().numpy() if on_gpu else x.as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", host.copy()),
                pb_utils.Tensor("WHERE", np.array([int(on_gpu)], dtype=np.int32)),
            ]))
        return responses
"""

PY_DOUBLE = """import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "X").as_numpy()).cuda()
            y = pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(x * 2))
            responses.append(pb_utils.InferenceResponse([y]))
        return responses
"""

PY_SLOW = """import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.w = torch.randn(2048, 2048, device="cuda", generator=g) / 45

    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "X").as_numpy()).cuda()
            x = x.reshape(-1, 2048)
            for _ in range(200):  # queued on the default stream: execute returns long before it ends
                x = torch.tanh(x @ self.w)
            y = pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(x.reshape(-1)))
            responses.append(pb_utils.InferenceResponse([y]))
        return responses
"""

PY_PROBED = """name: "ens_py_probe" platform: "ensemble" max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }, { name: "WHERE", data_type: TYPE_INT32, dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "py_double", model_version: -1, input_map { key: "X" value: "X" }, output_map { key: "Y" value: "d" } },
  { model_name: "probe", model_version: -1, input_map { key: "X" value: "d" },
    output_map { key: "Y" value: "Y" }, output_map { key: "WHERE" value: "WHERE" } } ] }
"""

BLS = """import numpy as np
import torch
import triton_python_backend_utils as pb_utils

GPU = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)


def call(x, **kw):
    r = pb_utils.InferenceRequest(model_name="pt_double", inputs=[pb_utils.Tensor("INPUT__0", x)],
                                  requested_output_names=["OUTPUT__0"], **kw).exec()
    if r.has_error():
        raise pb_utils.TritonModelException(r.error().message())
    y = pb_utils.get_output_tensor_by_name(r, "OUTPUT__0")
    if y.is_cpu():
        return y.as_numpy(), 0
    return torch.utils.dlpack.from_dlpack(y.to_dlpack()).cpu().numpy(), 1


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            lane, on_lane = call(x, preferred_memory=GPU)
            routed, on_router = call(x, preferred_memory=GPU, timeout=10**7)  # a timeout: through the router
            host, on_host = call(x)
            assert np.array_equal(lane, routed) and np.array_equal(lane, host)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", lane),
                pb_utils.Tensor("WHERE", np.array([on_lane, on_router, on_host], dtype=np.int32)),
            ]))
        return responses
"""


def _python_config(name: str, where: int, extra: str = "") -> str:
    """A Python model on GPU 0: X in, Y and (``where`` > 0) that many INT32 flags out."""
    flags = f', {{ name: "WHERE", data_type: TYPE_INT32, dims: [ {where} ] }}' if where else ""
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }}{flags} ]
instance_group [ {{ kind: KIND_GPU, count: 1, gpus: [ 0 ] }} ]
{extra}"""


BLS_CONFIG = _python_config("bls_gpu", 3)
PROBE_CONFIG = _python_config(
    "probe", 1, 'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value { string_value: "no" } }'
)


def _ensemble(name: str, second: str, outputs: str, extra_out: str = "") -> str:
    """X -> pt_double -> d -> ``second`` (input X or INPUT__0, outputs ``outputs``)."""
    second_in = "X" if second == "probe" else "INPUT__0"
    return f"""name: "{name}" platform: "ensemble" max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {outputs} ]
ensemble_scheduling {{ step [
  {{ model_name: "pt_double", model_version: -1, input_map {{ key: "INPUT__0" value: "X" }},
    output_map {{ key: "OUTPUT__0" value: "d" }} }},
  {{ model_name: "{second}", model_version: -1, input_map {{ key: "{second_in}" value: "d" }}{extra_out} }} ] }}
"""


PROBED = _ensemble(
    "ens_probe",
    "probe",
    '{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }, { name: "WHERE", data_type: TYPE_INT32, dims: [ 1 ] }',
    ', output_map { key: "Y" value: "Y" }, output_map { key: "WHERE" value: "WHERE" }',
)
# the same, but the intermediate is also an ensemble output: the router sends it, so it stays on the host
PROBED_HOST = _ensemble(
    "ens_probe_host",
    "probe",
    '{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }, { name: "WHERE", data_type: TYPE_INT32, dims: [ 1 ] },'
    ' { name: "d", data_type: TYPE_FP32, dims: [ -1 ] }',
    ', output_map { key: "Y" value: "Y" }, output_map { key: "WHERE" value: "WHERE" }',
)
CHAIN = _ensemble(
    "ens_chain", "pt_add_one", '{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }',
    ', output_map { key: "OUTPUT__0" value: "Y" }',
)  # fmt: skip

ADD_ONE = DOUBLE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    save_model(repo, "pt_double", Double(), DOUBLE)
    save_model(repo, "pt_add_one", AddOne(), ADD_ONE)
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "1" / "model.py").write_text(PROBE)
    (repo / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (repo / "bls_gpu" / "1").mkdir(parents=True)
    (repo / "bls_gpu" / "1" / "model.py").write_text(BLS)
    (repo / "bls_gpu" / "config.pbtxt").write_text(BLS_CONFIG)
    (repo / "py_double" / "1").mkdir(parents=True)
    (repo / "py_double" / "1" / "model.py").write_text(PY_DOUBLE)
    (repo / "py_double" / "config.pbtxt").write_text(_python_config("py_double", 0))
    (repo / "py_slow" / "1").mkdir(parents=True)
    (repo / "py_slow" / "1" / "model.py").write_text(PY_SLOW)
    (repo / "py_slow" / "config.pbtxt").write_text(_python_config("py_slow", 0))
    ensembles = {"ens_probe": PROBED, "ens_probe_host": PROBED_HOST, "ens_chain": CHAIN, "ens_py_probe": PY_PROBED}
    for name, text in ensembles.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text)
    # 1 MiB segments, 16 MiB at most: blocks that were never given back would fill it within
    # 64 requests of 256 KiB, and outputs would then go through the host (WHERE 0)
    srv = ServerProcess(repo, "--worker-arena-bytes", str(1 << 20)).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _probe(client: httpclient.InferenceServerClient, model: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    i = httpclient.InferInput("X", [x.size], "FP32")
    i.set_data_from_numpy(x)
    r = client.infer(model, [i])
    return r.as_numpy("Y"), int(r.as_numpy("WHERE")[0])


def test_a_step_output_read_only_on_gpus_stays_there(server: ServerProcess) -> None:
    client = server.client()
    try:
        rng = np.random.default_rng(1)
        for n in (1, 1000, 1 << 16):  # 4 bytes to 256 KiB
            x = rng.random(n, dtype=np.float32)
            y, where = _probe(client, "ens_probe", x)
            np.testing.assert_array_equal(y, 2 * x)
            assert where == 1, f"{n} elements: the probe's input was in host memory"
        y, where = _probe(client, "ens_py_probe", x)  # a Python model's GPU tensor stays there too
        np.testing.assert_array_equal(y, 2 * x)
        assert where == 1
        x = rng.random(1000, dtype=np.float32)
        y, where = _probe(client, "ens_probe_host", x)  # the router must send d: host memory
        np.testing.assert_array_equal(y, 2 * x)
        assert where == 0
    finally:
        client.close()


def test_blocks_go_back_to_the_arena(server: ServerProcess) -> None:
    client = server.client()
    try:
        x = np.arange(1 << 16, dtype=np.float32)
        for k in range(200):  # 50 MiB through a 16 MiB arena
            y, where = _probe(client, "ens_probe", x + k)
            assert where == 1, f"request {k}: the arena was full (blocks not given back?)"
            np.testing.assert_array_equal(y, 2 * (x + k))
    finally:
        client.close()


def test_concurrent_gpu_chains_keep_every_answer_their_own(server: ServerProcess) -> None:
    def one(k: int) -> None:
        c = server.client()
        try:
            rng = np.random.default_rng(k)
            for _ in range(20):
                x = rng.random(int(rng.integers(1, 70000)), dtype=np.float32)
                i = httpclient.InferInput("X", [x.size], "FP32")
                i.set_data_from_numpy(x)
                np.testing.assert_array_equal(c.infer("ens_chain", [i]).as_numpy("Y"), 2 * x + 1)
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(16)))


def test_a_killed_producer_comes_back_with_new_segments(server: ServerProcess) -> None:
    client = server.client()
    try:
        x = np.arange(4096, dtype=np.float32)
        assert _probe(client, "ens_probe", x)[1] == 1  # the probe has the old segment open
        (pid,) = server.worker_pids("pt_double")[-1:]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(server.worker_pids("pt_double")) > 1 and client.is_model_ready("pt_double"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("pt_double did not come back:\n" + server.log[-3000:])
        for k in range(5):
            y, where = _probe(client, "ens_probe", x + k)
            np.testing.assert_array_equal(y, 2 * (x + k))
            assert where == 1
    finally:
        client.close()


def test_bls_outputs_come_back_in_gpu_memory_when_asked(server: ServerProcess) -> None:
    client = server.client()
    try:
        x = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: 200 calls each way fill 16 MiB unless given back
        for k in range(200):
            i = httpclient.InferInput("X", [x.size], "FP32")
            i.set_data_from_numpy(x + k)
            r = client.infer("bls_gpu", [i])
            np.testing.assert_array_equal(r.as_numpy("Y"), 2 * (x + k))
            assert r.as_numpy("WHERE").tolist() == [1, 1, 0], f"call {k}: (lane, router, default) on the GPU"
    finally:
        client.close()


def test_a_python_models_gpu_output_reaches_cuda_shm_complete(server: ServerProcess) -> None:
    """A Python model returns a GPU tensor whose kernels still run on the default stream; its
    copy into the client's CUDA region must wait for them (it is compared with the same
    output sent inline, which comes down through the host after them)."""
    cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")
    client = server.client()
    x = np.random.default_rng(5).standard_normal(512 * 2048).astype(np.float32)
    h = cudashm.create_shared_memory_region("slow_out", x.nbytes, 0)
    try:
        client.register_cuda_shared_memory("slow_out", cudashm.get_raw_handle(h), 0, x.nbytes)
        i = httpclient.InferInput("X", [x.size], "FP32")
        i.set_data_from_numpy(x)
        inline = client.infer("py_slow", [i]).as_numpy("Y")
        for _ in range(3):
            o = httpclient.InferRequestedOutput("Y")
            o.set_shared_memory("slow_out", x.nbytes)
            client.infer("py_slow", [i], outputs=[o])
            np.testing.assert_allclose(cudashm.get_contents_as_numpy(h, np.float32, [x.size]), inline, rtol=1e-5)
            cudashm.set_shared_memory_region(h, [np.zeros_like(x)])
    finally:
        client.unregister_cuda_shared_memory()
        client.close()
        cudashm.destroy_shared_memory_region(h)
