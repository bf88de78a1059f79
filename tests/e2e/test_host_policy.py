"""``--host-policy`` (Triton's host policies): a worker runs on the ``cpu-cores`` of its
instance's policy, threads it starts included, and allocates from its ``numa-node``; an
instance follows the policy its ``instance_group.host_policy`` names, else ``cpu`` (KIND_CPU).
A policy the process cannot take fails the instance's load with Triton's text."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess, make_repository

pytestmark = pytest.mark.timeout(120)

if not {0, 1} <= os.sched_getaffinity(0):
    pytest.skip("needs CPUs 0 and 1", allow_module_level=True)


def _copy(repo: Path, name: str, policy: str) -> None:
    """Model ``placed`` as ``name``, its instance group following host policy ``policy``."""
    dst = repo / name
    shutil.copytree(repo / "placed", dst)
    cfg = (dst / "config.pbtxt").read_text().replace('name: "placed"', f'name: "{name}"')
    cfg = cfg.replace("count: 1 }", f'count: 1, host_policy: "{policy}" }}')
    (dst / "config.pbtxt").write_text(cfg)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "placed")
    _copy(repo, "placed_own", "pinned")
    _copy(repo, "placed_bad", "nowhere")
    srv = ServerProcess(
        repo,
        "--host-policy=cpu,cpu-cores=1-1",
        "--host-policy=pinned,cpu-cores=0-0",
        "--host-policy=pinned,numa-node=0",
        "--host-policy=nowhere,cpu-cores=3-2",  # no CPU at all
        "--host-policy=gpu_0,cpu-cores=0-0",  # no GPU instance here: changes nothing
    ).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _placed(srv: ServerProcess, model: str) -> tuple[list[int], list[int]]:
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        i = grpcclient.InferInput("IN", [1], "INT32")
        i.set_data_from_numpy(np.zeros(1, dtype=np.int32))
        r = c.infer(model, [i])
        return r.as_numpy("CPUS").tolist(), r.as_numpy("MEMPOLICY").tolist()
    finally:
        c.close()


def test_a_cpu_instance_follows_the_cpu_policy(server: ServerProcess) -> None:
    cpus, mem = _placed(server, "placed")
    assert cpus == [1]
    assert mem == [0, 0]  # MPOL_DEFAULT: the policy sets no node


def test_an_instance_group_names_its_own_policy(server: ServerProcess) -> None:
    cpus, mem = _placed(server, "placed_own")
    assert cpus == [0]
    assert mem == [2, 1]  # MPOL_BIND to node 0


def test_a_policy_the_worker_cannot_take_fails_its_load(server: ServerProcess) -> None:
    index = requests.post(f"http://{server.url}/v2/repository/index", json={}, timeout=30).json()
    bad = next(m for m in index if m["name"] == "placed_bad")
    assert bad["state"] == "UNAVAILABLE"
    assert "Unable to set NUMA thread affinity: Invalid argument" in bad["reason"]
    assert requests.get(f"http://{server.url}/v2/models/placed/ready", timeout=10).status_code == 200
