"""The pipelined worker (``WorkerRuntime._pipeline_lanes``) through the real server, on the
CPU: a PyTorch model with ``SHOAL_PIPELINE_BATCHES: true`` runs the GPU data path and the
pipeline on the CPU (two sets of staging buffers in turn; a batch read and launched before
the one before is answered). Under concurrent load over lanes, inline and in system shared
memory, with the router stopped, every answer holds its own request's rows and the
statistics count every request once; no stretch of time counts as the compute of two
executions. The same on a GPU: tests/gpu/test_pytorch_gpu.py."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Tuple  # noqa: UP035 - TorchScript's spelling

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import requests  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.utils.shared_memory as sysshm  # noqa: E402

from tests.e2e.pipelinecheck import assert_compute_counted_once  # noqa: E402
from tests.e2e.server import ServerProcess  # noqa: E402
from tests.e2e.test_frontend_lanes import RouterStopped  # noqa: E402
from tests.e2e.test_pytorch import save_model  # noqa: E402

pytestmark = pytest.mark.timeout(180)

N = 64
CLIENTS = 12
ROUNDS = 25


class Batched(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
        return x * 2 + y.to(torch.float32), x


def batched_config(n: int, max_batch: int, more: str) -> str:
    """The configuration of ``Batched`` with ``n`` elements per row, then ``more``."""
    return f"""max_batch_size: {max_batch}
input [ {{ name: "x", data_type: TYPE_FP32, dims: [ {n} ] }}, {{ name: "y", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ {n} ] }},
         {{ name: "OUTPUT__1", data_type: TYPE_FP32, dims: [ {n} ] }} ]
{more}"""


class Heavy(torch.nn.Module):  # type: ignore[misc,name-defined]
    """Compute that outweighs the worker's own work per batch (milliseconds for 32 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(512, 512) / 32, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(48):
            x = torch.tanh(x @ self.w)
        return x


HEAVY = """max_batch_size: 128
input [ { name: "x", data_type: TYPE_FP32, dims: [ 512 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 512 ] } ]
dynamic_batching { }
parameters { key: "SHOAL_PIPELINE_BATCHES" value { string_value: "true" } }
instance_group [ { kind: KIND_CPU, count: 1 } ]"""

CONFIG = batched_config(
    N,
    16,
    """dynamic_batching { }
parameters { key: "SHOAL_PIPELINE_BATCHES" value { string_value: "true" } }
instance_group [ { kind: KIND_CPU, count: 1 } ]""",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    save_model(repo, "pt_pipe", Batched(), CONFIG)
    save_model(repo, "pt_heavy", Heavy(), HEAVY)
    srv = ServerProcess(repo, "--frontend-processes", "2").start()
    try:
        yield srv
    finally:
        assert srv.terminate() == 0, srv.log
        assert not srv.segments()


def check_one(c: Any, model: str, x: np.ndarray, y: np.ndarray, region: tuple[Any, str] | None) -> None:
    """One gRPC request of ``Batched``, inline or with ``x`` and both outputs in the
    registered ``region`` (handle, name: x, then OUTPUT__0, then OUTPUT__1); checks the answer."""
    rows, n = x.shape
    ix, iy = grpcclient.InferInput("x", [rows, n], "FP32"), grpcclient.InferInput("y", [rows, 1], "INT32")
    iy.set_data_from_numpy(y)
    outs = [grpcclient.InferRequestedOutput("OUTPUT__0"), grpcclient.InferRequestedOutput("OUTPUT__1")]
    if region is None:
        ix.set_data_from_numpy(x)
        r = c.infer(model, [ix, iy], outputs=outs)
        got0, got1 = r.as_numpy("OUTPUT__0"), r.as_numpy("OUTPUT__1")
    else:
        h, name = region
        sysshm.set_shared_memory_region(h, [x])
        ix.set_shared_memory(name, x.nbytes)
        outs[0].set_shared_memory(name, x.nbytes, offset=x.nbytes)
        outs[1].set_shared_memory(name, x.nbytes, offset=2 * x.nbytes)
        c.infer(model, [ix, iy], outputs=outs)
        whole = sysshm.get_contents_as_numpy(h, np.float32, [3 * rows, n])
        got0, got1 = whole[rows : 2 * rows], whole[2 * rows :]
    np.testing.assert_array_equal(got0, x * 2 + y.astype(np.float32))
    np.testing.assert_array_equal(got1, x)


def _stats(srv: ServerProcess, model: str = "pt_pipe") -> tuple[int, int]:
    s = _model_stats(srv, model)
    return int(s["inference_count"]), int(s["execution_count"])


def _model_stats(srv: ServerProcess, model: str) -> dict[str, Any]:
    return requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]  # type: ignore[no-any-return]


def test_pipelined_batches_keep_every_answer_its_own(server: ServerProcess) -> None:
    time.sleep(0.3)  # the routes reach the frontends
    regions: list[Any] = []
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for k in range(CLIENTS):
            key = f"/shoaltest_{os.getpid()}_pipe{k}"
            regions.append(sysshm.create_shared_memory_region(f"pipe{k}", key, 3 * 2 * N * 4))
            c.register_system_shared_memory(f"pipe{k}", key, 3 * 2 * N * 4)
        inf0, exe0 = _stats(server)
        gate = threading.Barrier(CLIENTS)
        errors: list[BaseException] = []

        def one(k: int) -> None:
            g = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                gate.wait()
                for i in range(ROUNDS):
                    rows = 1 + (k + i) % 2
                    rng = np.random.default_rng(1000 * k + i)
                    x = rng.standard_normal((rows, N)).astype(np.float32)
                    y = np.full((rows, 1), k * 100 + i, np.int32)
                    check_one(g, "pt_pipe", x, y, None if (k + i) % 3 else (regions[k], f"pipe{k}"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                g.close()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(CLIENTS)]
        with RouterStopped(server):  # lanes only, batched by the worker
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert not errors, errors[0]
        inf1, exe1 = _stats(server)
        assert inf1 - inf0 == sum(1 + (k + i) % 2 for k in range(CLIENTS) for i in range(ROUNDS))
        assert exe1 - exe0 < CLIENTS * ROUNDS, "the requests were not batched"
        for k in range(CLIENTS):
            c.unregister_system_shared_memory(f"pipe{k}")
    finally:
        c.close()
        for h in regions:
            sysshm.destroy_shared_memory_region(h)


def test_pipelined_compute_time_is_counted_once(server: ServerProcess) -> None:
    """While batch N runs, the worker reads and launches N+1 (on the CPU: runs it); that time is
    N+1's compute input and infer, not N's too."""
    time.sleep(0.3)  # the routes reach the frontends
    assert_compute_counted_once(server, "pt_heavy", 512)
