"""Client shared memory: who may register what, what errors reveal, and what a client can
do to a worker by changing its own object under a request."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, in_private_mounts, needs_private_dev_shm
from tests.security.conftest import limited, request
from tests.security.test_limits import KEY_PREFIX, Objects, external_ip, register

NOBODY = 65534
UNUSABLE = "': invalid args"
"""The end of Triton's text for a key that cannot be registered (it names the client's region)."""


@pytest.fixture
def objects() -> Iterator[Objects]:
    o = Objects()
    yield o
    o.cleanup()


def shm_infer(port: int, region: str, n: int = 4, out_offset: int = 16) -> tuple[int, dict[str, Any]]:
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [n],
                "parameters": {"shared_memory_region": region, "shared_memory_byte_size": 4 * n},
            }
        ],
        "outputs": [
            {
                "name": "OUTPUT0",
                "parameters": {
                    "shared_memory_region": region,
                    "shared_memory_offset": out_offset,
                    "shared_memory_byte_size": 4 * n,
                },
            }
        ],
    }
    return request(port, "POST", "/v2/models/identity_fp32/infer", json.dumps(body).encode())


def as_user(uid: int, fn: Any) -> Any:
    """Run ``fn()`` in a forked child with ``uid`` (only stdlib networking in it); returns its
    JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps(fn()).encode()
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


# ---- who may register, and what the errors say ---------------------------------------------------


def test_remote_clients_may_not_register(repo: Path, fresh: list[ServerProcess], objects: Objects) -> None:
    ip = external_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address to be a remote client from")
    srv = limited(repo, "--host", "0.0.0.0").start()
    fresh.append(srv)
    key = objects.create(4096)
    code, reply = register(ip, srv.port, "r", key, 64)
    assert code == 403 and "--client-shm-access=any" in reply["error"], reply
    g = grpcclient.InferenceServerClient(f"{ip}:{srv.grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as err:
            g.register_system_shared_memory("r", key, 64)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
    finally:
        g.close()
    # a local client may; a remote one sees none of its regions
    assert register("127.0.0.1", srv.port, "r", key, 64)[0] == 200
    conn = http.client.HTTPConnection(ip, srv.port, timeout=10)
    conn.request("GET", "/v2/systemsharedmemory/status")
    assert json.loads(conn.getresponse().read()) == []
    conn.close()


def test_triton_behaviour_behind_a_flag(repo: Path, fresh: list[ServerProcess], objects: Objects) -> None:
    ip = external_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address to be a remote client from")
    srv = limited(repo, "--host", "0.0.0.0", "--client-shm-access", "any").start()
    fresh.append(srv)
    key = objects.create(4096)
    assert register(ip, srv.port, "r", key, 64)[0] == 200
    # one namespace for every client, as in Triton
    assert [r["name"] for r in request(srv.port, "GET", "/v2/systemsharedmemory/status")[1]] == ["r"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_keys_must_belong_to_the_client(server: ServerProcess, objects: Objects) -> None:
    """A client running as another user cannot register (so read or write) an object that
    is not its own, and gets the same answer as for a key that does not exist; its own
    object it can. Each client sees and unregisters only its own regions."""
    secret = objects.create(4096, b"root's secret")
    theirs = objects.create(4096)
    os.chown(f"/dev/shm/{theirs}", NOBODY, NOBODY)
    port = server.port

    def attempt() -> dict[str, Any]:
        out = {}
        for name, key in (("a", secret), ("b", f"{KEY_PREFIX}nothing"), ("c", theirs)):
            out[name] = register("127.0.0.1", port, name, key, 64)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v2/systemsharedmemory/status")
        out["status"] = json.loads(conn.getresponse().read())
        conn.close()
        return out

    got = as_user(NOBODY, attempt)
    # one answer whatever the reason (it names the client's own region, as Triton's does)
    a_error, b_error = got["a"][1]["error"], got["b"][1]["error"]
    assert got["a"][0] == got["b"][0] == 400 and a_error.replace("'a'", "'b'") == b_error, got
    assert a_error == "failed to register shared memory region 'a': invalid args", got
    assert got["c"][0] == 200
    assert [r["name"] for r in got["status"]] == ["c"]
    # root's client does not see, use or unregister nobody's region
    assert request(server.port, "GET", "/v2/systemsharedmemory/status")[1] == []
    code, reply = shm_infer(server.port, "c")
    assert code == 404 and reply["error"] == "Unable to find shared memory region: 'c'"
    assert request(server.port, "POST", "/v2/systemsharedmemory/unregister", b"")[0] == 200
    again = as_user(NOBODY, lambda: register("127.0.0.1", port, "c", theirs, 64))
    assert again[0] == 400 and again[1]["error"] == "shared memory region 'c' already in manager"  # still there


def test_key_prefix_allow_list(repo: Path, fresh: list[ServerProcess], objects: Objects) -> None:
    srv = limited(repo, "--client-shm-key-prefix", f"/{KEY_PREFIX}ok").start()
    fresh.append(srv)
    other = objects.create(4096)
    code, reply = register("127.0.0.1", srv.port, "r", other, 64)
    assert code == 400 and UNUSABLE in reply["error"]
    name = f"{KEY_PREFIX}ok_{os.getpid()}"
    objects.names.append(name)
    Path("/dev/shm", name).write_bytes(bytes(4096))
    assert register("127.0.0.1", srv.port, "r", name, 64)[0] == 200


def test_keys_that_are_not_objects(server: ServerProcess, tmp_path: Path) -> None:
    """Directories, symlinks and FIFOs in /dev/shm, and the names '.' and '..': a clear 400,
    never a 500 and never a hang (a FIFO would block a plain open)."""
    made = []
    base = f"{KEY_PREFIX}odd"
    try:
        os.mkdir(f"/dev/shm/{base}_dir")
        made.append(f"/dev/shm/{base}_dir")
        target = tmp_path / "target"
        target.write_bytes(bytes(4096))
        os.symlink(target, f"/dev/shm/{base}_link")
        made.append(f"/dev/shm/{base}_link")
        os.mkfifo(f"/dev/shm/{base}_fifo")
        made.append(f"/dev/shm/{base}_fifo")
        for key in (".", "..", "/.", f"{base}_dir", f"{base}_link", f"{base}_fifo"):
            t0 = time.monotonic()
            code, reply = register("127.0.0.1", server.port, "odd", key, 8)
            assert code == 400, (key, reply)
            assert time.monotonic() - t0 < 2
    finally:
        for path in made:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)


# ---- a client changing its object under requests -------------------------------------------------


def test_object_replaced_after_registration(server: ServerProcess, objects: Objects) -> None:
    key = objects.create(4096, np.arange(4, dtype=np.float32).tobytes())
    assert register("127.0.0.1", server.port, "swap", key, 64)[0] == 200
    try:
        os.unlink(f"/dev/shm/{key}")
        Path("/dev/shm", key).write_bytes(bytes(4096))  # same name, another object
        code, reply = shm_infer(server.port, "swap")
        assert code == 400 and "another object" in reply["error"], reply
    finally:
        request(server.port, "POST", "/v2/systemsharedmemory/region/swap/unregister", b"")


def test_truncating_an_object_under_requests(server: ServerProcess, objects: Objects) -> None:
    """A client truncates and regrows its object while requests use it: each request
    succeeds or fails cleanly; the worker never dies of it (no SIGBUS)."""
    n = 64 * 1024
    size = 8 * n + 4096
    key = objects.create(size, np.ones(n, np.float32).tobytes())
    assert register("127.0.0.1", server.port, "trunc", key, size)[0] == 200
    pids = server.worker_pids("identity_fp32")
    stop = threading.Event()

    def flip() -> None:
        path = f"/dev/shm/{key}"
        while not stop.is_set():
            os.truncate(path, 100)
            os.truncate(path, size)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    codes: dict[int, int] = {}
    try:
        for _ in range(200):
            code, _ = shm_infer(server.port, "trunc", n=n, out_offset=4 * n)
            codes[code] = codes.get(code, 0) + 1
    finally:
        stop.set()
        flipper.join(10)
        request(server.port, "POST", "/v2/systemsharedmemory/region/trunc/unregister", b"")
    assert set(codes) <= {200, 400, 429}, codes
    assert server.worker_pids("identity_fp32") == pids
    assert "SIGBUS" not in server.log and "died" not in server.log


_FULL_DEV_SHM = """
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", "/dev/shm"], check=True)
from tests.e2e.server import ServerProcess
from tests.security.conftest import request
srv = ServerProcess(sys.argv[2], "--shm-arena-bytes", str(1 << 20), "--worker-arena-bytes", str(1 << 20)).start()
try:
    key = "shoaltest_sparse"
    fd = os.open("/dev/shm/" + key, os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, bytes(16))
    os.ftruncate(fd, 64 << 20)  # sparse: 64 MiB on a 12 MiB /dev/shm
    os.close(fd)
    n = 2 << 20  # 8 MiB in (the router's arena takes 8 of the 12) and 8 MiB out where no page exists
    reg = request(srv.port, "POST", "/v2/systemsharedmemory/region/s/register",
                  json.dumps({"key": key, "byte_size": 64 << 20}).encode())
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n], "parameters": {"binary_data_size": 4 * n}}],
            "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "s",
                         "shared_memory_offset": 32 << 20, "shared_memory_byte_size": 4 * n}}]}
    head = json.dumps(body).encode()
    code, reply = request(srv.port, "POST", "/v2/models/identity_fp32/infer", head + bytes(4 * n),
                          {"Inference-Header-Content-Length": str(len(head))})
    small = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    after = request(srv.port, "POST", "/v2/models/identity_fp32/infer", json.dumps(small).encode())[0]
    print(json.dumps({"register": reg[0], "code": code, "reply": reply, "after": after, "log": srv.log}))
finally:
    srv.terminate()
"""


@needs_private_dev_shm
def test_output_into_a_sparse_region_on_a_full_dev_shm(tmp_path: Path) -> None:
    """A client registers a sparse object larger than /dev/shm can hold and asks for an
    output where it has no pages: the request fails (no space), the worker lives. Runs in
    a private mount namespace with a 12 MiB /dev/shm."""
    from tests.e2e.server import make_repository

    out = in_private_mounts(_FULL_DEV_SHM, str(make_repository(tmp_path / "repo", "identity_fp32")), timeout_s=120)
    assert out["register"] == 200
    assert out["code"] in (429, 500) and "shared memory region" in out["reply"]["error"], out["reply"]
    assert out["after"] == 200
    assert "SIGBUS" not in out["log"] and "died" not in out["log"]


def test_mapped_mode_uses_regions_in_place(repo: Path, fresh: list[ServerProcess], objects: Objects) -> None:
    """--client-shm-mapped=true (trusted clients): the worker maps the object and answers
    from it; a truncation seen before the use is still an error, not SIGBUS."""
    srv = limited(repo, "--client-shm-mapped", "true").start()
    fresh.append(srv)
    data = np.arange(4, dtype=np.float32)
    key = objects.create(4096, data.tobytes())
    assert register("127.0.0.1", srv.port, "m", key, 4096)[0] == 200
    assert shm_infer(srv.port, "m")[0] == 200
    out = np.frombuffer(Path("/dev/shm", key).read_bytes()[16:32], dtype=np.float32)
    assert (out == data).all()
    worker = srv.worker_pids("identity_fp32")[0]
    maps = Path(f"/proc/{worker}/maps").read_text()
    assert key in maps
    os.truncate(f"/dev/shm/{key}", 8)
    code, reply = shm_infer(srv.port, "m")
    assert code == 400 and "smaller than when it was registered" in reply["error"], reply
    assert srv.worker_pids("identity_fp32") == [worker]
