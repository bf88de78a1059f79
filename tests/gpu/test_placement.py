"""Instance groups on GPUs (needs 2 GPUs; the device tool's nvidia-h200-x2): instances land
on the GPUs their group names, each worker has its GPU as CUDA device 0, and requests spread
over the instances."""

from __future__ import annotations

import collections
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402

from tests.e2e.server import ServerProcess, make_repository  # noqa: E402

GROUPS = {
    "where_default": "",  # no instance_group: one KIND_GPU instance on every GPU
    "where_listed": "instance_group [ { kind: KIND_GPU, count: 2, gpus: [ 1 ] }, { kind: KIND_GPU, gpus: [ 0 ] } ]",
    "where_auto": "instance_group [ { kind: KIND_AUTO, count: 1 } ]",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "gpu_where")
    base = (repo / "gpu_where" / "config.pbtxt").read_text()
    base = base.replace("instance_group [ { kind: KIND_GPU, count: 1 } ]\n", "")
    for name, groups in GROUPS.items():
        shutil.copytree(repo / "gpu_where", repo / name)
        (repo / name / "config.pbtxt").write_text(base.replace('"gpu_where"', f'"{name}"') + groups + "\n")
    shutil.rmtree(repo / "gpu_where")
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log


def _uuids() -> list[str]:
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def _fire(server: ServerProcess, model: str, n: int, delay_ms: int) -> list[Any]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: list[Any] = []
    done = threading.Semaphore(0)
    try:
        for _ in range(n):
            inp = grpcclient.InferInput("DELAY_MS", [1], "INT32")
            inp.set_data_from_numpy(np.array([delay_ms], dtype=np.int32))

            def cb(result: Any, error: Any) -> None:
                results.append(error if error is not None else result)
                done.release()

            client.async_infer(model, [inp], cb)
        for _ in range(n):
            assert done.acquire(timeout=60)
    finally:
        client.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    return results


def _where(results: list[Any]) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((r.as_numpy("UUID")[0].decode(), int(r.as_numpy("PID")[0])) for r in results)


def test_config_shows_placement(server: ServerProcess) -> None:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        cfg = c.get_model_config("where_default", as_json=True)["config"]
        (g,) = cfg["instance_group"]
        assert g["kind"] == "KIND_GPU" and [int(x) for x in g["gpus"]] == list(range(torch.cuda.device_count()))
        auto = c.get_model_config("where_auto", as_json=True)["config"]["instance_group"][0]
        assert auto["kind"] == "KIND_GPU"
    finally:
        c.close()


def test_default_group_one_instance_per_gpu(server: ServerProcess) -> None:
    where = _where(_fire(server, "where_default", 16, 100))
    uuids = {u for u, _ in where}
    assert uuids == set(_uuids()), where  # every GPU served some requests
    assert len({p for _, p in where}) == torch.cuda.device_count()


def test_listed_gpus(server: ServerProcess) -> None:
    uuids = _uuids()
    results = _fire(server, "where_listed", 24, 100)
    where = _where(results)
    per_gpu = collections.Counter(u for u, _ in where.elements())
    pids_per_gpu = collections.defaultdict(set)
    for u, p in where:
        pids_per_gpu[u].add(p)
    assert set(per_gpu) == {uuids[0], uuids[1]}, where
    assert len(pids_per_gpu[uuids[1]]) == 2 and len(pids_per_gpu[uuids[0]]) == 1
    assert all(int(r.as_numpy("DEVICE_ID")[0]) == 0 for r in results)  # its GPU is device 0


def test_worker_environment(server: ServerProcess) -> None:
    log = server.log
    assert "where_listed" in log
    for pid in server.worker_pids("where_listed"):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        visible = [e for e in env if e.startswith(b"CUDA_VISIBLE_DEVICES=")]
        assert visible, env
