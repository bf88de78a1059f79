"""The PyTorch backend on a GPU (``workers/backends/torchgpu.py``): a KIND_GPU instance reads
inputs in CUDA shared memory as GPU tensors (DLPack, no host copy) and writes outputs back
there device to device; host inputs of a batch are gathered through pinned staging into one
device buffer and outputs come back once per batch; batches of several requests with inputs
inline, in system shared memory and in CUDA shared memory; no device-memory growth over
10k requests. Run with ``scripts/gpu_check`` on the device machine."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Tuple  # noqa: UP035 - TorchScript's spelling

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.utils.shared_memory as sysshm  # noqa: E402

from tests.e2e.server import ServerProcess, at_once  # noqa: E402
from tests.e2e.test_pipelined_worker import Batched, batched_config, check_one  # noqa: E402
from tests.e2e.test_pytorch import DOUBLE, Double, save_model  # noqa: E402

N = 16384
"""Elements of ``x`` per request (64 KiB: over the inline limit, so it travels in the arena)."""


BATCHED = batched_config(
    N,
    32,
    """dynamic_batching { max_queue_delay_microseconds: 50000 }
instance_group [ { kind: KIND_GPU, count: 1 } ]""",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    save_model(repo, "pt_double_gpu", Double(), DOUBLE)
    save_model(repo, "pt_batched_gpu", Batched(), BATCHED)
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def test_gpu_instance_with_cuda_shared_memory(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.random.default_rng(3).random(1 << 16, dtype=np.float32)
    h_in = cudashm.create_shared_memory_region("pt_in", x.nbytes, 0)
    h_out = cudashm.create_shared_memory_region("pt_out", x.nbytes, 0)
    try:
        cudashm.set_shared_memory_region(h_in, [x])
        client.register_cuda_shared_memory("pt_in", cudashm.get_raw_handle(h_in), 0, x.nbytes)
        client.register_cuda_shared_memory("pt_out", cudashm.get_raw_handle(h_out), 0, x.nbytes)
        i = grpcclient.InferInput("INPUT__0", [x.size], "FP32")
        i.set_shared_memory("pt_in", x.nbytes)
        o = grpcclient.InferRequestedOutput("OUTPUT__0")
        o.set_shared_memory("pt_out", x.nbytes)
        client.infer("pt_double_gpu", [i], outputs=[o])
        np.testing.assert_array_equal(cudashm.get_contents_as_numpy(h_out, np.float32, [x.size]), 2 * x)
        inline = grpcclient.InferInput("INPUT__0", [x.size], "FP32")
        inline.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("pt_double_gpu", [inline]).as_numpy("OUTPUT__0"), 2 * x)
    finally:
        client.unregister_cuda_shared_memory()
        client.close()
        cudashm.destroy_shared_memory_region(h_in)
        cudashm.destroy_shared_memory_region(h_out)


def _stats(server: ServerProcess, model: str) -> tuple[int, int]:
    c = httpclient.InferenceServerClient(server.url)
    try:
        s = c.get_inference_statistics(model)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])
    finally:
        c.close()


def _inputs(k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(k).standard_normal((rows, N)).astype(np.float32)
    return x, np.full((rows, 1), k, np.int32)


def test_batch_of_inline_and_system_shm_requests(server: ServerProcess) -> None:
    """Sixteen requests (1 or 2 rows) at once, half with inputs and outputs in system shared
    memory: they run in few executions and each gets its own rows back."""
    inf0, exe0 = _stats(server, "pt_batched_gpu")

    def one(k: int) -> None:
        rows = 1 + k % 2
        x, y = _inputs(k, rows)
        c = grpcclient.InferenceServerClient(server.grpc_url)
        handles: list[Any] = []
        try:
            if k % 4 < 2:
                check_one(c, "pt_batched_gpu", x, y, None)
            else:
                name = f"pt_sys_{k}"
                h = sysshm.create_shared_memory_region(name, f"/shoaltest_{os.getpid()}_{k}", 3 * x.nbytes)
                handles.append(h)
                c.register_system_shared_memory(name, f"/shoaltest_{os.getpid()}_{k}", 3 * x.nbytes)
                check_one(c, "pt_batched_gpu", x, y, (h, name))
                c.unregister_system_shared_memory(name)
        finally:
            c.close()
            for h in handles:
                sysshm.destroy_shared_memory_region(h)

    at_once(16, one)
    inf1, exe1 = _stats(server, "pt_batched_gpu")
    assert inf1 - inf0 == 24
    assert exe1 - exe0 < 16, "the requests were not batched"


def test_batch_of_cuda_shm_requests(server: ServerProcess) -> None:
    """Twelve requests at once with ``x`` in CUDA shared memory: eight want both outputs in
    CUDA regions (kept on the device), four want them inline (copied back once)."""
    inf0, exe0 = _stats(server, "pt_batched_gpu")

    def one(k: int) -> None:
        x, y = _inputs(100 + k, 1)
        c = grpcclient.InferenceServerClient(server.grpc_url)
        name = f"pt_cuda_{k}"
        h = cudashm.create_shared_memory_region(name, 3 * x.nbytes, 0)
        try:
            cudashm.set_shared_memory_region(h, [x])
            c.register_cuda_shared_memory(name, cudashm.get_raw_handle(h), 0, 3 * x.nbytes)
            ix = grpcclient.InferInput("x", [1, N], "FP32")
            ix.set_shared_memory(name, x.nbytes)
            iy = grpcclient.InferInput("y", [1, 1], "INT32")
            iy.set_data_from_numpy(y)
            outs = [grpcclient.InferRequestedOutput("OUTPUT__0"), grpcclient.InferRequestedOutput("OUTPUT__1")]
            if k < 8:
                outs[0].set_shared_memory(name, x.nbytes, offset=x.nbytes)
                outs[1].set_shared_memory(name, x.nbytes, offset=2 * x.nbytes)
                c.infer("pt_batched_gpu", [ix, iy], outputs=outs)
                whole = cudashm.get_contents_as_numpy(h, np.float32, [3, N])
                got0, got1 = whole[1:2], whole[2:3]
            else:
                r = c.infer("pt_batched_gpu", [ix, iy], outputs=outs)
                got0, got1 = r.as_numpy("OUTPUT__0"), r.as_numpy("OUTPUT__1")
            np.testing.assert_array_equal(got0, x * 2 + (100 + k))
            np.testing.assert_array_equal(got1, x)
            c.unregister_cuda_shared_memory(name)
        finally:
            c.close()
            cudashm.destroy_shared_memory_region(h)

    at_once(12, one)
    inf1, exe1 = _stats(server, "pt_batched_gpu")
    assert inf1 - inf0 == 12
    assert exe1 - exe0 < 12, "the requests were not batched"


def test_no_device_memory_growth(server: ServerProcess) -> None:
    """10k requests of 1 to 3 rows from 16 clients: the GPU's used memory (NVML, every
    process) grows by less than 64 MiB once the first 1000 have run."""
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        used = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)  # noqa: E731
        pids = server.worker_pids("pt_batched_gpu")

        def load(per_thread: int) -> Callable[[int], None]:
            def one(k: int) -> None:
                c = grpcclient.InferenceServerClient(server.grpc_url)
                try:
                    for j in range(per_thread):
                        rows = 1 + (k + j) % 3
                        x, y = _inputs(k, rows)
                        ix = grpcclient.InferInput("x", [rows, N], "FP32")
                        ix.set_data_from_numpy(x)
                        iy = grpcclient.InferInput("y", [rows, 1], "INT32")
                        iy.set_data_from_numpy(y)
                        r = c.infer("pt_batched_gpu", [ix, iy], outputs=[grpcclient.InferRequestedOutput("OUTPUT__0")])
                        if j % 97 == 0:
                            np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x * 2 + k)
                finally:
                    c.close()

            return one

        at_once(16, load(1000 // 16 + 1))
        before = used()
        at_once(16, load(10000 // 16 + 1))
        after = used()
        assert after - before < 64 << 20, f"device memory grew by {(after - before) >> 20} MiB"
        assert server.worker_pids("pt_batched_gpu") == pids, "the worker was restarted"
    finally:
        pynvml.nvmlShutdown()


class HostSync(torch.nn.Module):  # type: ignore[misc,name-defined]
    """Branches on its data (a host synchronization): cannot be captured in a CUDA graph."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
        if bool(x.abs().sum() > 1e30):
            return x, x
        return x * 2 + y.to(torch.float32), x


GRAPHS = BATCHED.replace("dynamic_batching", "optimization { cuda { graphs: true } }\ndynamic_batching")


@pytest.fixture(scope="module")
def lanes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    save_model(repo, "pt_batched_gpu", Batched(), BATCHED)
    save_model(repo, "pt_graphs_gpu", Batched(), GRAPHS)
    save_model(repo, "pt_graphs_fail", HostSync(), GRAPHS)
    srv = ServerProcess(repo, "--frontend-processes", "2").start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def test_the_worker_batches_lane_requests_on_the_gpu(lanes_server: ServerProcess) -> None:
    """With frontend processes, plain requests of a dynamic-batching GPU model go over lanes
    and the worker batches them itself (``workers.lanebatch``): each gets its own rows back,
    in fewer executions than requests."""
    time.sleep(0.3)  # the routes reach the frontends
    inf0, exe0 = _stats(lanes_server, "pt_batched_gpu")

    def one(k: int) -> None:
        rows = 1 + k % 2
        x, y = _inputs(k, rows)
        c = httpclient.InferenceServerClient(lanes_server.url) if k % 2 else None
        g = None if c else grpcclient.InferenceServerClient(lanes_server.grpc_url)
        try:
            mod = httpclient if c else grpcclient
            ix, iy = mod.InferInput("x", [rows, N], "FP32"), mod.InferInput("y", [rows, 1], "INT32")
            ix.set_data_from_numpy(x)
            iy.set_data_from_numpy(y)
            r = (c or g).infer("pt_batched_gpu", [ix, iy])  # type: ignore[union-attr]
            np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x * 2 + k)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), x)
        finally:
            (c or g).close()  # type: ignore[union-attr]

    at_once(16, one)
    inf1, exe1 = _stats(lanes_server, "pt_batched_gpu")
    assert inf1 - inf0 == 24
    assert exe1 - exe0 < 16, "the requests were not batched"


def test_sustained_lane_load_keeps_every_answer_its_own(lanes_server: ServerProcess) -> None:
    """Twenty-four clients sending 30 requests each, back to back, inline and in system
    shared memory: the worker reads and launches a batch while the one before runs on the
    GPU (``WorkerRuntime._pipeline_lanes``, two sets of pinned buffers in turn). Every answer
    holds the rows of its own request, and the statistics count every request once."""
    time.sleep(0.3)  # the routes reach the frontends
    inf0, _ = _stats(lanes_server, "pt_batched_gpu")
    rounds = 30

    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(lanes_server.grpc_url)
        key = f"/shoaltest_{os.getpid()}_pipe{k}"
        name = f"pipe_{k}"
        h = sysshm.create_shared_memory_region(name, key, 3 * 2 * N * 4)
        try:
            c.register_system_shared_memory(name, key, 3 * 2 * N * 4)
            for i in range(rounds):
                rows = 1 + (k + i) % 2
                x, y = _inputs(1000 * k + i, rows)
                check_one(c, "pt_batched_gpu", x, y, None if (k + i) % 3 else (h, name))
            c.unregister_system_shared_memory(name)
        finally:
            c.close()
            sysshm.destroy_shared_memory_region(h)

    at_once(24, one)
    inf1, _ = _stats(lanes_server, "pt_batched_gpu")
    assert inf1 - inf0 == sum(1 + (k + i) % 2 for k in range(24) for i in range(rounds))


@pytest.mark.parametrize("model", ["pt_graphs_gpu", "pt_graphs_fail"])
def test_cuda_graphs_serve_every_batch_size(lanes_server: ServerProcess, model: str) -> None:
    """``optimization { cuda { graphs: true } }`` (``workers/backends/torchgraphs``): graphs for
    batch sizes 1, 2, 4, ..., 32; batches of every size in between are padded into the next
    graph and each request gets its own rows back, alone and batched with others. A module
    that cannot be captured (it branches on its data) is served without graphs."""
    if model == "pt_graphs_gpu":
        assert "captured CUDA graphs for batch sizes [1, 2, 4, 8, 16, 32]" in lanes_server.log
    else:
        assert f"model '{model}': CUDA graphs not used, capturing failed" in lanes_server.log
    time.sleep(0.3)  # the routes reach the frontends
    inf0, _ = _stats(lanes_server, model)
    c = httpclient.InferenceServerClient(lanes_server.url)
    try:
        for rows in (1, 3, 5, 17, 32):
            x, y = _inputs(rows, rows)
            ix, iy = httpclient.InferInput("x", [rows, N], "FP32"), httpclient.InferInput("y", [rows, 1], "INT32")
            ix.set_data_from_numpy(x)
            iy.set_data_from_numpy(y)
            r = c.infer(model, [ix, iy])
            np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x * 2 + rows)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), x)
    finally:
        c.close()

    def one(k: int) -> None:
        g = grpcclient.InferenceServerClient(lanes_server.grpc_url)
        try:
            for i in range(10):
                rows = 1 + (k + i) % 3
                x, y = _inputs(100 * k + i, rows)
                ix, iy = grpcclient.InferInput("x", [rows, N], "FP32"), grpcclient.InferInput("y", [rows, 1], "INT32")
                ix.set_data_from_numpy(x)
                iy.set_data_from_numpy(y)
                r = g.infer(model, [ix, iy])
                np.testing.assert_array_equal(r.as_numpy("OUTPUT__0"), x * 2 + y.astype(np.float32))
                np.testing.assert_array_equal(r.as_numpy("OUTPUT__1"), x)
        finally:
            g.close()

    at_once(12, one)
    inf1, _ = _stats(lanes_server, model)
    assert inf1 - inf0 == 58 + sum(1 + (k + i) % 3 for k in range(12) for i in range(10))
