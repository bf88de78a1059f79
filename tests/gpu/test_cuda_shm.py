"""CUDA shared memory through the real server with ``tritonclient.utils.cuda_shared_memory``
over HTTP and gRPC. Needs a CUDA GPU, CuPy and cuda-python; skipped cleanly otherwise.
Run on a GPU machine with ``scripts/gpu_check`` (it prints a summary)."""

from __future__ import annotations

import base64
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA GPU", allow_module_level=True)
except Exception as exc:  # noqa: BLE001 - no driver at all
    pytest.skip(f"no CUDA GPU ({exc})", allow_module_level=True)
cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.utils.shared_memory as sysshm  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.e2e.server import ServerProcess, make_repository  # noqa: E402

MODELS = ("add_sub", "identity_fp32", "simple_onnx", "gpu_double", "slow", "gpu_ens")


@pytest.fixture(scope="module", params=["router", "frontends"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Alone, and with frontend processes (requests naming CUDA regions go over lanes)."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), *MODELS)
    on_gpu = repo / "gpu_double_on_gpu"
    shutil.copytree(repo / "gpu_double", on_gpu)
    cfg = (on_gpu / "config.pbtxt").read_text()
    cfg = cfg.replace('name: "gpu_double"', 'name: "gpu_double_on_gpu"').replace("KIND_CPU", "KIND_GPU")
    (on_gpu / "config.pbtxt").write_text(cfg)
    args = ("--frontend-processes", "2") if request.param == "frontends" else ()
    srv = ServerProcess(repo, *args).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


class CudaRegions:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.handles: list[Any] = []

    def create(self, name: str, nbytes: int, device: int = 0) -> Any:
        h = cudashm.create_shared_memory_region(name, nbytes, device)
        self.handles.append(h)
        return h

    def close(self) -> None:
        c = httpclient.InferenceServerClient(self.server.url)
        try:
            c.unregister_cuda_shared_memory()
            c.unregister_system_shared_memory()
        finally:
            c.close()
        for h in self.handles:
            cudashm.destroy_shared_memory_region(h)


@pytest.fixture
def regions(server: ServerProcess) -> Iterator[CudaRegions]:
    r = CudaRegions(server)
    yield r
    r.close()


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[tuple[Any, Any]]:
    if request.param == "http":
        c: Any = httpclient.InferenceServerClient(server.url)
        mod: Any = httpclient
    else:
        c, mod = grpcclient.InferenceServerClient(server.grpc_url), grpcclient
    yield c, mod
    c.close()


def test_register_status_unregister(client: tuple[Any, Any], regions: CudaRegions) -> None:
    c, _ = client
    h = regions.create("c0", 64)
    c.register_cuda_shared_memory("c0", cudashm.get_raw_handle(h), 0, 64)
    status = c.get_cuda_shared_memory_status()
    if isinstance(status, list):
        assert status == [{"name": "c0", "device_id": 0, "byte_size": 64}]
    else:
        assert status.regions["c0"].byte_size == 64 and status.regions["c0"].device_id == 0
    with pytest.raises(InferenceServerException):
        c.register_cuda_shared_memory("c0", cudashm.get_raw_handle(h), 0, 64)
    c.unregister_cuda_shared_memory("c0")
    status = c.get_cuda_shared_memory_status()
    assert not (status if isinstance(status, list) else status.regions)


def test_inputs_and_outputs_in_cuda_shm(client: tuple[Any, Any], regions: CudaRegions) -> None:
    """A CPU Python model: the worker copies the inputs to the host and the outputs back."""
    c, mod = client
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 3, dtype=np.float32)
    h_in = regions.create("cin", 32)
    h_out = regions.create("cout", 32)
    cudashm.set_shared_memory_region(h_in, [a, b])
    c.register_cuda_shared_memory("cin", cudashm.get_raw_handle(h_in), 0, 32)
    c.register_cuda_shared_memory("cout", cudashm.get_raw_handle(h_out), 0, 32)
    i0 = mod.InferInput("INPUT0", [4], "FP32")
    i0.set_shared_memory("cin", 16)
    i1 = mod.InferInput("INPUT1", [4], "FP32")
    i1.set_shared_memory("cin", 16, offset=16)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("cout", 16)
    o1 = mod.InferRequestedOutput("OUTPUT1")
    o1.set_shared_memory("cout", 16, offset=16)
    c.infer("add_sub", [i0, i1], outputs=[o0, o1])
    np.testing.assert_array_equal(cudashm.get_contents_as_numpy(h_out, np.float32, [4]), a + b)
    out1 = cudashm.get_contents_as_numpy(h_out, np.float32, [8])[4:]
    np.testing.assert_array_equal(out1, a - b)


def test_onnx_model_batch_in_cuda_shm(client: tuple[Any, Any], regions: CudaRegions) -> None:
    c, mod = client
    x = np.arange(32, dtype=np.int32).reshape(2, 16)
    y = np.full((2, 16), 5, dtype=np.int32)
    h = regions.create("onnx", 4 * x.nbytes)
    cudashm.set_shared_memory_region(h, [x, y])
    c.register_cuda_shared_memory("onnx", cudashm.get_raw_handle(h), 0, 4 * x.nbytes)
    n = x.nbytes
    i0 = mod.InferInput("INPUT0", [2, 16], "INT32")
    i0.set_shared_memory("onnx", n)
    i1 = mod.InferInput("INPUT1", [2, 16], "INT32")
    i1.set_shared_memory("onnx", n, offset=n)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("onnx", n, offset=2 * n)
    o1 = mod.InferRequestedOutput("OUTPUT1")
    result = c.infer("simple_onnx", [i0, i1], outputs=[o0, o1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x - y)
    whole = cudashm.get_contents_as_numpy(h, np.int32, [8, 16])
    np.testing.assert_array_equal(whole[4:6], x + y)


def test_python_model_gets_gpu_tensors(client: tuple[Any, Any], regions: CudaRegions) -> None:
    """FORCE_CPU_ONLY_INPUT_TENSORS "no": the model sees a GPU tensor over the client's CUDA
    memory (DLPack, no host copy) and its GPU output is copied device to device."""
    pytest.importorskip("torch")
    c, mod = client
    n = 1 << 20
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    h_in = regions.create("gin", x.nbytes)
    h_out = regions.create("gout", x.nbytes)
    cudashm.set_shared_memory_region(h_in, [x])
    c.register_cuda_shared_memory("gin", cudashm.get_raw_handle(h_in), 0, x.nbytes)
    c.register_cuda_shared_memory("gout", cudashm.get_raw_handle(h_out), 0, x.nbytes)
    i0 = mod.InferInput("INPUT0", [n], "FP32")
    i0.set_shared_memory("gin", x.nbytes)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("gout", x.nbytes)
    flag = mod.InferRequestedOutput("INPUT_ON_GPU")
    result = c.infer("gpu_double", [i0], outputs=[o0, flag])
    assert result.as_numpy("INPUT_ON_GPU").tolist() == [True]
    np.testing.assert_array_equal(cudashm.get_contents_as_numpy(h_out, np.float32, [n]), x * 2)
    # the same model with an inline input gets a CPU tensor and still answers
    i0 = mod.InferInput("INPUT0", [4], "FP32")
    i0.set_data_from_numpy(x[:4])
    result = c.infer("gpu_double", [i0])
    assert result.as_numpy("INPUT_ON_GPU").tolist() == [False]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x[:4] * 2)


def test_cuda_input_system_output(client: tuple[Any, Any], regions: CudaRegions) -> None:
    c, mod = client
    x = np.arange(8, dtype=np.float32)
    h_in = regions.create("mix_in", x.nbytes)
    cudashm.set_shared_memory_region(h_in, [x])
    c.register_cuda_shared_memory("mix_in", cudashm.get_raw_handle(h_in), 0, x.nbytes)
    key = f"/shoaltest_{os.getpid()}_mix"
    h_out = sysshm.create_shared_memory_region("mix_out", key, x.nbytes)
    try:
        c.register_system_shared_memory("mix_out", key, x.nbytes)
        i0 = mod.InferInput("INPUT0", [8], "FP32")
        i0.set_shared_memory("mix_in", x.nbytes)
        o0 = mod.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory("mix_out", x.nbytes)
        c.infer("identity_fp32", [i0], outputs=[o0])
        np.testing.assert_array_equal(sysshm.get_contents_as_numpy(h_out, np.float32, [8]), x)
        c.unregister_system_shared_memory("mix_out")
    finally:
        sysshm.destroy_shared_memory_region(h_out)


def test_bad_cuda_registrations(server: ServerProcess, regions: CudaRegions) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        # 64 random bytes are no IPC handle: a worker fails to open it; it is not registered
        bogus = base64.b64encode(np.random.default_rng(1).bytes(64))
        with pytest.raises(InferenceServerException) as err:
            c.register_cuda_shared_memory("bogus", bogus, 0, 64)
        assert err.value.message() == "failed to register shared memory region: invalid args"  # Triton's
        assert c.get_cuda_shared_memory_status() == []
        h = regions.create("small", 64)
        with pytest.raises(InferenceServerException) as err:
            c.register_cuda_shared_memory("toolarge", cudashm.get_raw_handle(h), 0, 1 << 30)
        assert err.value.message() == "failed to register shared memory region 'toolarge': invalid args"
        count = cupy.cuda.runtime.getDeviceCount()
        with pytest.raises(InferenceServerException) as err:
            c.register_cuda_shared_memory("nodev", cudashm.get_raw_handle(h), count, 64)
        assert "device_id" in str(err.value)
        c.register_cuda_shared_memory("small", cudashm.get_raw_handle(h), 0, 64)
        i0 = httpclient.InferInput("INPUT0", [4], "FP32")
        i0.set_shared_memory("small", 16, offset=56)
        with pytest.raises(InferenceServerException) as err:
            c.infer("identity_fp32", [i0])
        assert "Invalid offset + byte size for shared memory region: 'small'" in str(err.value)
        assert c.is_server_ready()
    finally:
        c.close()


def test_unregister_while_in_flight(server: ServerProcess, regions: CudaRegions) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = np.arange(1024, dtype=np.float32)
        h = regions.create("busy", x.nbytes)
        cudashm.set_shared_memory_region(h, [x])
        g.register_cuda_shared_memory("busy", cudashm.get_raw_handle(h), 0, x.nbytes)
        results: list[Any] = []
        done = threading.Event()

        def cb(result: Any, error: Any) -> None:
            results.append(error or result)
            done.set()

        i0 = grpcclient.InferInput("INPUT0", [1024], "FP32")
        i0.set_shared_memory("busy", x.nbytes)
        g.async_infer("slow", [i0], cb, parameters={"delay_ms": 300})
        time.sleep(0.1)
        g.unregister_cuda_shared_memory("busy")
        assert done.wait(30)
        assert not isinstance(results[0], Exception), results[0]
        np.testing.assert_array_equal(results[0].as_numpy("OUTPUT0"), x)
    finally:
        g.close()


def test_ensemble_across_devices_with_cuda_shm(client: tuple[Any, Any], regions: CudaRegions) -> None:
    """gpu_ens: a KIND_GPU step (PyTorch) then a CPU step; X and Y in CUDA shared memory,
    then inline; 1 MiB tensors, so the GPU step's output reaches the CPU step through the
    GPU worker's output arena."""
    c, mod = client
    x = np.random.default_rng(7).random(1 << 18, dtype=np.float32)
    h_in = regions.create("ens_in", x.nbytes)
    h_out = regions.create("ens_out", x.nbytes)
    cudashm.set_shared_memory_region(h_in, [x])
    c.register_cuda_shared_memory("ens_in", cudashm.get_raw_handle(h_in), 0, x.nbytes)
    c.register_cuda_shared_memory("ens_out", cudashm.get_raw_handle(h_out), 0, x.nbytes)
    i = mod.InferInput("X", [x.size], "FP32")
    i.set_shared_memory("ens_in", x.nbytes)
    o = mod.InferRequestedOutput("Y")
    o.set_shared_memory("ens_out", x.nbytes)
    c.infer("gpu_ens", [i], outputs=[o])
    np.testing.assert_array_equal(cudashm.get_contents_as_numpy(h_out, np.float32, [x.size]), 2 * x)
    inline = mod.InferInput("X", [x.size], "FP32")
    inline.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("gpu_ens", [inline]).as_numpy("Y"), 2 * x)


def test_gpu_metrics(server: ServerProcess) -> None:
    """nv_gpu_* per GPU, labelled only by gpu_uuid, in the form perf_analyzer's
    --collect-metrics parser reads (its regex, applied to our text)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    gpus = cupy.cuda.runtime.getDeviceCount()
    for name in ("nv_gpu_utilization", "nv_gpu_power_usage", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"):
        found = re.findall(rf"\n{name}\{{gpu_uuid=\"([^\"]+)\"\}} (\d+\.?\d*)(?=\n)", text)
        assert len(found) == gpus, (name, found, text[-2000:])
        assert all(uuid.startswith("GPU-") for uuid, _ in found)
    totals = [float(v) for _, v in re.findall(r"\nnv_gpu_memory_total_bytes\{gpu_uuid=\"([^\"]+)\"\} (\S+)", text)]
    assert all(t > 1 << 30 for t in totals)
