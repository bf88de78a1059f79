"""Tensors larger than the shared-memory arenas may grow, or arriving while the arenas are
full, are served (in the channel's messages, as Triton serves any size) instead of refused
with "shared memory ... full": through the router and through frontend processes' lanes,
over HTTP and gRPC, by BLS too, with many such requests at once; nothing is left behind.
The arenas here are small (the router's input arena 4 MiB, each worker's output arena
16 MiB) so the sizes stay cheap; with the defaults the limits are 1 GiB and 256 MiB."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess, in_private_mounts, make_repository, needs_private_dev_shm

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
SMALL_ARENAS = (
    "--shm-arena-bytes", str(MiB), "--shm-arena-max-bytes", str(4 * MiB), "--worker-arena-bytes", str(MiB),
)  # fmt: skip


BIGSTREAM = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            count, mib = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().tolist()
            sender = request.get_response_sender()
            for i in range(count):
                out = np.full(mib << 18, i, dtype=np.float32)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
BIGSTREAM_CONFIG = """backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 2 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""


@pytest.fixture(scope="module", params=["router", "frontends"])
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    models = ("identity_fp32", "bls_identity", "ens_chain3", "slow", "gate")
    repo = make_repository(tmp_path_factory.mktemp("repo"), *models)
    (repo / "bigstream" / "1").mkdir(parents=True)
    (repo / "bigstream" / "1" / "model.py").write_text(BIGSTREAM)
    (repo / "bigstream" / "config.pbtxt").write_text(BIGSTREAM_CONFIG)
    frontends = ("--frontend-processes", "2") if request.param == "frontends" else ()
    srv = ServerProcess(repo, *SMALL_ARENAS, *frontends).start()
    yield srv
    assert srv.terminate() == 0, srv.log[-3000:]
    assert not srv.segments()
    assert "Traceback" not in srv.log, srv.log[-3000:]


def _echo(client: Any, model: str, x: np.ndarray) -> np.ndarray:
    mod = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("OUTPUT0")  # type: ignore[no-any-return]


def _client(srv: ServerProcess, protocol: str) -> Any:
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(srv.grpc_url)
    return httpclient.InferenceServerClient(srv.url, network_timeout=120.0, connection_timeout=120.0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["identity_fp32", "bls_identity"])
def test_a_tensor_larger_than_the_arenas_is_served(server: ServerProcess, protocol: str, model: str) -> None:
    """24 MiB in and out: more than the router's input arena (4 MiB) and the worker's output
    arena (16 MiB) may ever hold; before, 429 "the server's shared memory for tensors is full"."""
    x = np.random.default_rng(1).standard_normal(6 * MiB).astype(np.float32)
    c = _client(server, protocol)
    try:
        np.testing.assert_array_equal(_echo(c, model, x), x)
        small = np.arange(8, dtype=np.float32)
        np.testing.assert_array_equal(_echo(c, model, small), small)
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_steps_pass_tensors_larger_than_the_arenas(server: ServerProcess, protocol: str) -> None:
    """Three steps (slow -> gate -> slow), 24 MiB between each: step outputs that no worker
    arena can hold reach the next step through the router in the messages."""
    x = np.abs(np.random.default_rng(2).standard_normal(6 * MiB)).astype(np.float32)  # gate refuses negatives
    mod: Any = grpcclient if protocol == "grpc" else httpclient
    c = _client(server, protocol)
    try:
        inp = mod.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("ens_chain3", [inp]).as_numpy("Y"), x)
    finally:
        c.close()


def test_a_stream_of_responses_larger_than_the_arenas(server: ServerProcess) -> None:
    """A decoupled model streams 6 responses of 20 MiB (more than its worker's arena may
    hold, 16 MiB) over gRPC: each arrives, in order, in the messages."""
    import queue

    got: queue.Queue[Any] = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        c.start_stream(callback=lambda result, error: got.put(error if error is not None else result))
        inp = grpcclient.InferInput("IN", [2], "INT32")
        inp.set_data_from_numpy(np.array([6, 20], dtype=np.int32))
        c.async_stream_infer("bigstream", [inp])
        for i in range(6):
            item = got.get(timeout=60)
            assert not isinstance(item, Exception), item
            out = item.as_numpy("OUT")
            assert out.shape == (20 * MiB // 4,) and out[0] == i and out[-1] == i
    finally:
        c.stop_stream()
        c.close()


def test_many_large_requests_at_once_overflow_into_messages(server: ServerProcess) -> None:
    """12 clients at once, 3 MiB each way: each fits an arena alone, together they do not
    (the later ones travel in messages while the arenas are full); every answer is its own."""

    def one(k: int) -> bool:
        x = np.full(3 * MiB // 4, k, dtype=np.float32)
        c = _client(server, "grpc" if k % 2 else "http")
        try:
            for _ in range(3):
                got = _echo(c, "identity_fp32", x)
                if got.shape != x.shape or not (got == k).all():
                    return False
            return True
        finally:
            c.close()

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(12)))


_DOCKER_SHM = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", sys.argv[3], "tmpfs", "/dev/shm"], check=True)
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tests.e2e.server import ServerProcess
srv = ServerProcess(sys.argv[2], *sys.argv[4:]).start()
served = {}
try:
    for mib in (1, 16, 48):
        x = np.full(mib << 18, mib, dtype=np.float32)
        for mod, url in ((httpclient, srv.url), (grpcclient, srv.grpc_url)):
            c = mod.InferenceServerClient(url)
            i = mod.InferInput("INPUT0", list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            try:
                out = c.infer("identity_fp32", [i]).as_numpy("OUTPUT0")
                served[f"{mib} {mod.__name__}"] = bool(out.shape == x.shape and (out == mib).all())
            except Exception as exc:
                served[f"{mib} {mod.__name__}"] = str(exc)
            c.close()
finally:
    rc = srv.terminate()
print(json.dumps({"served": served, "rc": rc, "log": srv.log}))
"""


@needs_private_dev_shm
def test_docker_default_dev_shm_serves_large_tensors(tmp_path: Path) -> None:
    """docker's default /dev/shm is 64 MB: the router's first 64 MiB arena segment fills it,
    and every tensor over 32 KiB used to fail (429, "cannot reserve ... in /dev/shm"). Now
    they travel in the messages, with a warning, once per process, naming --shm-size. Runs in a
    private mount namespace with a 64 MiB /dev/shm and the default arena settings."""
    out = in_private_mounts(_DOCKER_SHM, str(make_repository(tmp_path / "repo", "identity_fp32")), "size=64m")
    assert all(v is True for v in out["served"].values()), out["served"]
    assert out["rc"] == 0
    assert out["log"].count("went in the message") <= 2, out["log"][-3000:]  # the worker's, the router's
    assert "--shm-size" in out["log"]


@needs_private_dev_shm
@pytest.mark.parametrize("frontends", [(), ("--frontend-processes", "2")], ids=["router", "frontends"])
def test_a_read_only_dev_shm_serves_through_the_messages(tmp_path: Path, frontends: tuple[str, ...]) -> None:
    """No usable /dev/shm (read-only here; absent or not writable alike): the server used to
    stop at start (its owner lock lives there) or fail every large tensor with a 500
    "Read-only file system"; now it starts, says so once, and every tensor travels in the
    messages. Triton serves ONNX and PyTorch models without /dev/shm too."""
    repo = make_repository(tmp_path / "repo", "identity_fp32")
    out = in_private_mounts(_DOCKER_SHM, str(repo), "ro,size=1m", *frontends)
    assert all(v is True for v in out["served"].values()), out["served"]
    assert out["rc"] == 0
    assert "no usable shared memory in /dev/shm" in out["log"], out["log"][-3000:]
