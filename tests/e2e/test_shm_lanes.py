"""Client shared memory over lanes (``frontproc.shmmirror`` and ``frontproc.shmregions``): with
frontend processes, a request naming registered regions goes from the frontend straight to a
worker, with the region's descriptor, as the router would send it. Proven with the router
stopped (SIGSTOP); then unregistration as a barrier across frontends, and a frontend killed
while it holds regions (the workers still unmap them once they are unregistered).

Every behaviour of ``test_shared_memory.py`` (errors included) is also checked with frontend
processes there."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, served, wait_until
from tests.e2e.test_frontend_lanes import RouterStopped
from tests.e2e.test_frontend_processes import frontend_pids
from tests.e2e.test_shared_memory import _mapped

pytestmark = pytest.mark.timeout(180)

KEY_PREFIX = f"/shoaltest_lanes_{os.getpid()}_"
TOLD_S = 0.3
"""Enough for the frontends to hear of a registration and the router's routes (every 50 ms)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("identity_fp32", "add_sub", "lane_batcher", "slow"),
                      "--frontend-processes", "2")  # fmt: skip


class Region:
    """A client region, registered over HTTP; unregistered and destroyed at the end."""

    def __init__(self, srv: ServerProcess, name: str, nbytes: int) -> None:
        self.srv, self.name, self.key = srv, name, KEY_PREFIX + name
        self.handle = shm.create_shared_memory_region(name, self.key, nbytes)
        self.nbytes = nbytes

    def register(self) -> None:
        with httpclient.InferenceServerClient(self.srv.url) as c:
            c.register_system_shared_memory(self.name, self.key, self.nbytes)

    def unregister(self) -> None:
        with httpclient.InferenceServerClient(self.srv.url) as c:
            c.unregister_system_shared_memory(self.name)

    def put(self, *arrays: np.ndarray) -> None:
        shm.set_shared_memory_region(self.handle, list(arrays))

    def get(self, shape: list[int], offset: int) -> np.ndarray:
        return shm.get_contents_as_numpy(self.handle, np.float32, shape, offset=offset)

    def close(self) -> None:
        try:
            self.unregister()
        finally:
            shm.destroy_shared_memory_region(self.handle)


@pytest.fixture
def region(server: ServerProcess) -> Iterator[Region]:
    r = Region(server, "lanes", 4096)
    yield r
    r.close()


def _identity(mod: Any, url: str, name: str, n: int, model: str = "identity_fp32", timeout: float = 10.0) -> None:
    """INPUT0 from the start of region ``name``, OUTPUT0 into it right after."""
    i0 = mod.InferInput("INPUT0", [n], "FP32")
    i0.set_shared_memory(name, n * 4)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory(name, n * 4, offset=n * 4)
    if mod is httpclient:
        with httpclient.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout) as c:
            c.infer(model, [i0], outputs=[o0])
    else:
        with grpcclient.InferenceServerClient(url) as c:
            c.infer(model, [i0], outputs=[o0], client_timeout=timeout)


def _stats(srv: ServerProcess, model: str) -> dict[str, Any]:
    s = requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10).json()
    return s["model_stats"][0]  # type: ignore[no-any-return]


def test_shm_requests_are_answered_while_the_router_is_stopped(server: ServerProcess, region: Region) -> None:
    n = 64
    region.register()
    time.sleep(TOLD_S)
    before = int(_stats(server, "identity_fp32")["inference_count"])
    for k in range(6):  # fresh connections: both frontend processes answer
        data = np.arange(n, dtype=np.float32) + k
        region.put(data, np.zeros(n, dtype=np.float32))
        with RouterStopped(server):
            _identity(httpclient if k % 2 else grpcclient, server.url if k % 2 else server.grpc_url, "lanes", n)
        np.testing.assert_array_equal(region.get([n], n * 4), data)
    # counted as the router counts its own requests
    wait_until(lambda: int(_stats(server, "identity_fp32")["inference_count"]) == before + 6, 10)


def test_shm_requests_of_a_batching_model_batch_in_the_worker(server: ServerProcess) -> None:
    """Four requests in four regions, sent together while the router is stopped: the worker
    batches them (REQUESTS is 4 for each), each output in its own region."""
    n = 8
    regions = [Region(server, f"batch{k}", 1024) for k in range(4)]
    try:
        for k, r in enumerate(regions):
            r.register()
            r.put(np.full(n, k, dtype=np.float32))
        time.sleep(TOLD_S)

        def one(k: int) -> int:
            i0 = httpclient.InferInput("INPUT0", [1, n], "FP32")
            i0.set_shared_memory(f"batch{k}", n * 4)
            o0 = httpclient.InferRequestedOutput("OUTPUT0")
            o0.set_shared_memory(f"batch{k}", n * 4, offset=512)
            with httpclient.InferenceServerClient(server.url, network_timeout=30) as c:
                got = c.infer("lane_batcher", [i0], outputs=[o0, httpclient.InferRequestedOutput("REQUESTS")])
            out = got.as_numpy("REQUESTS")
            assert out is not None
            return int(out[0][0])

        with RouterStopped(server), concurrent.futures.ThreadPoolExecutor(4) as pool:
            counts = list(pool.map(one, range(4)))
        assert counts == [4, 4, 4, 4]
        for k, r in enumerate(regions):
            np.testing.assert_array_equal(r.get([n], 512), np.full(n, k, dtype=np.float32))
    finally:
        for r in regions:
            r.close()


def test_after_unregister_no_frontend_uses_the_region(server: ServerProcess, region: Region) -> None:
    """Unregister answers once both frontends dropped the region: every request after it,
    through either frontend, is the router's NOT_FOUND; registered again, it works again."""
    n = 16
    region.put(np.ones(n, dtype=np.float32))
    for _ in range(5):
        region.register()
        time.sleep(TOLD_S)
        _identity(grpcclient, server.grpc_url, "lanes", n)
        region.unregister()
        for k in range(4):
            with pytest.raises(InferenceServerException) as err:
                _identity(httpclient if k % 2 else grpcclient, server.url if k % 2 else server.grpc_url, "lanes", n)
            assert "Unable to find shared memory region: 'lanes'" in str(err.value)


def test_the_worker_unmaps_a_region_a_killed_frontend_held(server: ServerProcess, region: Region) -> None:
    """A frontend killed while it holds a region gives its hold up (its successor gets the
    whole table): unregistered, the region is unmapped in the worker."""
    n = 16
    region.put(np.ones(n, dtype=np.float32))
    region.register()
    time.sleep(TOLD_S)
    for _ in range(4):  # over lanes: the worker maps it
        _identity(httpclient, server.url, "lanes", n)
    pid = server.worker_pids("identity_fp32")[0]
    assert _mapped(pid, region.key)
    before = frontend_pids(server)
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: len(frontend_pids(server)) == 2 and frontend_pids(server) != before, 30)
    time.sleep(TOLD_S)
    for _ in range(4):  # both frontends (one new) use it
        _identity(httpclient, server.url, "lanes", n, timeout=30)
    region.unregister()
    wait_until(lambda: not _mapped(pid, region.key), 10)


def test_any_access_keeps_its_lanes_after_an_unregister(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--client-shm-access=any`` (one namespace, as Triton): after another region's
    unregistration (news for every frontend), a region is still used over lanes."""
    repo = make_repository(tmp_path_factory.mktemp("repo"), "identity_fp32")
    srv = ServerProcess(repo, "--frontend-processes", "2", "--client-shm-access=any").start()
    n = 16
    keep, gone = Region(srv, "keep", 1024), Region(srv, "gone", 1024)
    try:
        keep.register()
        gone.register()
        gone.unregister()
        time.sleep(TOLD_S)
        data = np.arange(n, dtype=np.float32)
        keep.put(data, np.zeros(n, dtype=np.float32))
        with RouterStopped(srv):
            for k in range(4):
                _identity(httpclient if k % 2 else grpcclient, srv.url if k % 2 else srv.grpc_url, "keep", n)
        np.testing.assert_array_equal(keep.get([n], n * 4), data)
    finally:
        keep.close()
        shm.destroy_shared_memory_region(gone.handle)
        assert srv.terminate() == 0, srv.log  # also when the test failed: no server left behind
    assert not srv.segments(), srv.segments()
