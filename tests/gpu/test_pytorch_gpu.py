"""The PyTorch backend on a GPU: a KIND_GPU instance reads its input from CUDA shared memory
as a GPU tensor (DLPack, no host copy) and writes its output back there device to device.
Run with ``scripts/gpu_check`` on the device machine."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")

import tritonclient.grpc as grpcclient  # noqa: E402

from tests.e2e.server import ServerProcess  # noqa: E402
from tests.e2e.test_pytorch import DOUBLE, Double, save_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    save_model(repo, "pt_double_gpu", Double(), DOUBLE)
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
