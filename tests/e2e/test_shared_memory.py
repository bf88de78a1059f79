"""Client system shared memory (Triton's extension) through the real server with
tritonclient's ``shared_memory`` utilities, over HTTP and gRPC: inputs and outputs in
regions, mixed with inline tensors, batching and BYTES models, every bad registration and
reference we could think of, unregistering while requests use a region, and clients that
go away or shrink their segment. CUDA shared memory is in tests/gpu/.

Every test runs twice: against the router alone, and with frontend processes, whose requests
naming a region go straight to a worker over a lane (``frontproc.shmregions``) while the
router keeps registration, unregistration and every error (``test_shm_lanes.py`` proves the
lanes are taken)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

from tests.e2e.conftest import ALL_MODELS
from tests.e2e.server import ServerProcess, make_repository

KEY_PREFIX = f"shoaltest_{os.getpid()}_"


class Regions:
    """Client regions a test creates; destroyed (and unregistered) at the end."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.handles: list[Any] = []

    def create(self, name: str, nbytes: int) -> Any:
        key = f"/{KEY_PREFIX}{name}"
        handle = shm.create_shared_memory_region(name, key, nbytes)
        self.handles.append(handle)
        return handle

    def key(self, name: str) -> str:
        return f"/{KEY_PREFIX}{name}"

    def close(self) -> None:
        c = httpclient.InferenceServerClient(self.server.url)
        try:
            c.unregister_system_shared_memory()
        finally:
            c.close()
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture(scope="module", params=["router", "frontends"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The conftest's server, once alone and once with two frontend processes."""
    pytest.importorskip("onnxruntime")
    repo = make_repository(tmp_path_factory.mktemp("repo"), *ALL_MODELS)
    args = ("--frontend-processes", "2") if request.param == "frontends" else ()
    srv = ServerProcess(repo, *args).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


@pytest.fixture
def regions(server: ServerProcess) -> Iterator[Regions]:
    r = Regions(server)
    yield r
    r.close()


@pytest.fixture
def hc(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture
def gc_(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def post(server: ServerProcess, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(server.url, timeout=30)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else {})
    finally:
        conn.close()


def get(server: ServerProcess, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.url, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def add_sub_request(client_mod: Any, in_region: str, out_region: str, *, proto: str = "http") -> tuple[Any, Any]:
    i0 = client_mod.InferInput("INPUT0", [4], "FP32")
    i0.set_shared_memory(in_region, 16)
    i1 = client_mod.InferInput("INPUT1", [4], "FP32")
    i1.set_shared_memory(in_region, 16, offset=16)
    o0 = client_mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory(out_region, 16)
    o1 = client_mod.InferRequestedOutput("OUTPUT1")
    o1.set_shared_memory(out_region, 16, offset=16)
    return [i0, i1], [o0, o1]


# ---- happy paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_inputs_and_outputs_in_shm(
    proto: str, regions: Regions, hc: httpclient.InferenceServerClient, gc_: grpcclient.InferenceServerClient
) -> None:
    client, mod = (hc, httpclient) if proto == "http" else (gc_, grpcclient)
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 10, dtype=np.float32)
    h_in = regions.create("in", 32)
    h_out = regions.create("out", 32)
    shm.set_shared_memory_region(h_in, [a, b])
    client.register_system_shared_memory("in", regions.key("in"), 32)
    client.register_system_shared_memory("out", regions.key("out"), 32)
    inputs, outputs = add_sub_request(mod, "in", "out")
    result = client.infer("add_sub", inputs, outputs=outputs)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4]), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4], offset=16), a - b)
    # the response describes the outputs but carries none of their bytes
    if proto == "http":
        outs = result.get_response()["outputs"]
        assert [o["name"] for o in outs] == ["OUTPUT0", "OUTPUT1"]
        assert all("data" not in o and "binary_data_size" not in o.get("parameters", {}) for o in outs)
    else:
        resp = result.get_response()
        assert [o.name for o in resp.outputs] == ["OUTPUT0", "OUTPUT1"]
        assert all(len(c) == 0 for c in resp.raw_output_contents)
    # the same regions again with new data: the worker reads the current bytes
    shm.set_shared_memory_region(h_in, [a * 2, b])
    client.infer("add_sub", inputs, outputs=outputs)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4]), a * 2 + b)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_mixed_shm_and_inline_tensors(
    proto: str, regions: Regions, hc: httpclient.InferenceServerClient, gc_: grpcclient.InferenceServerClient
) -> None:
    client, mod = (hc, httpclient) if proto == "http" else (gc_, grpcclient)
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    b = np.array([4, 3, 2, 1], dtype=np.float32)
    h_in = regions.create("min", 16)
    h_out = regions.create("mout", 16)
    shm.set_shared_memory_region(h_in, [a])
    client.register_system_shared_memory("min", regions.key("min"), 16)
    client.register_system_shared_memory("mout", regions.key("mout"), 16)
    i0 = mod.InferInput("INPUT0", [4], "FP32")
    i0.set_shared_memory("min", 16)
    i1 = mod.InferInput("INPUT1", [4], "FP32")
    i1.set_data_from_numpy(b)
    # the shm output first: a positional client must still find the inline one
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("mout", 16)
    o1 = mod.InferRequestedOutput("OUTPUT1")
    result = client.infer("add_sub", [i0, i1], outputs=[o0, o1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [4]), a + b)


def test_registration_offset_and_batching_model(
    regions: Regions, hc: httpclient.InferenceServerClient, gc_: grpcclient.InferenceServerClient
) -> None:
    """A region that starts at an offset inside its object (not page aligned), a batch of
    3 in an INT32 batching ONNX model, over both protocols."""
    x = np.arange(48, dtype=np.int32).reshape(3, 16)
    y = np.ones((3, 16), dtype=np.int32)
    h = regions.create("big", 1000 + 4 * 192 * 2)
    shm.set_shared_memory_region(h, [x, y], offset=1000)
    nbytes = x.nbytes
    for client, mod, name in ((hc, httpclient, "boff_h"), (gc_, grpcclient, "boff_g")):
        client.register_system_shared_memory(name, regions.key("big"), 4 * 192 * 2, offset=1000)
        i0 = mod.InferInput("INPUT0", [3, 16], "INT32")
        i0.set_shared_memory(name, nbytes)
        i1 = mod.InferInput("INPUT1", [3, 16], "INT32")
        i1.set_shared_memory(name, nbytes, offset=nbytes)
        o0 = mod.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory(name, nbytes, offset=2 * nbytes)
        o1 = mod.InferRequestedOutput("OUTPUT1")
        o1.set_shared_memory(name, nbytes, offset=3 * nbytes)
        client.infer("simple_onnx", [i0, i1], outputs=[o0, o1])
        out0 = shm.get_contents_as_numpy(h, np.int32, [3, 16], offset=1000 + 2 * nbytes)
        out1 = shm.get_contents_as_numpy(h, np.int32, [3, 16], offset=1000 + 3 * nbytes)
        np.testing.assert_array_equal(out0, x + y)
        np.testing.assert_array_equal(out1, x - y)
        shm.set_shared_memory_region(h, [np.zeros(96, dtype=np.int32)], offset=1000 + 2 * nbytes)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_bytes_tensors_in_shm(
    proto: str, regions: Regions, hc: httpclient.InferenceServerClient, gc_: grpcclient.InferenceServerClient
) -> None:
    client, mod = (hc, httpclient) if proto == "http" else (gc_, grpcclient)
    data = np.array([[b"shoal", b"", b"\xc3\xa9t\xc3\xa9"]], dtype=np.object_)
    blob = serialize_byte_tensor(data)
    nbytes = serialized_byte_size(blob)
    h_in = regions.create("sin", nbytes)
    h_out = regions.create("sout", 256)
    shm.set_shared_memory_region(h_in, [blob])
    client.register_system_shared_memory("sin", regions.key("sin"), nbytes)
    client.register_system_shared_memory("sout", regions.key("sout"), 256)
    i0 = mod.InferInput("INPUT0", [1, 3], "BYTES")
    i0.set_shared_memory("sin", nbytes)
    o0 = mod.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("sout", 200)
    o1 = mod.InferRequestedOutput("OUTPUT1")
    o1.set_shared_memory("sout", 12, offset=200)
    client.infer("strings", [i0], outputs=[o0, o1])
    upper = shm.get_contents_as_numpy(h_out, np.object_, [1, 3])
    assert upper.tolist() == [[b"SHOAL", b"", b"\xc3\xa9T\xc3\xa9"]]  # bytes.upper() leaves non-ASCII alone
    lengths = shm.get_contents_as_numpy(h_out, np.int32, [1, 3], offset=200)
    assert lengths.tolist() == [[5, 0, 5]]


def test_status_and_unregister(
    regions: Regions, hc: httpclient.InferenceServerClient, gc_: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    regions.create("st1", 64)
    regions.create("st2", 128)
    hc.unregister_system_shared_memory()  # nothing registered: succeeds (perf_analyzer does this)
    gc_.unregister_system_shared_memory()
    hc.register_system_shared_memory("st1", regions.key("st1"), 64)
    gc_.register_system_shared_memory("st2", regions.key("st2"), 100, offset=28)
    status = sorted(hc.get_system_shared_memory_status(), key=lambda r: r["name"])
    assert status == [
        {"name": "st1", "key": regions.key("st1"), "offset": 0, "byte_size": 64},
        {"name": "st2", "key": regions.key("st2"), "offset": 28, "byte_size": 100},
    ]
    one = gc_.get_system_shared_memory_status("st2")
    assert one.regions["st2"].byte_size == 100 and one.regions["st2"].offset == 28
    assert get(server, "/v2/cudasharedmemory/status") == (200, [])
    # a system region asked for through the CUDA endpoint is not found
    assert get(server, "/v2/cudasharedmemory/region/st1/status")[0] == 404
    hc.unregister_system_shared_memory("st1")
    hc.unregister_system_shared_memory("never-registered")
    assert [r["name"] for r in hc.get_system_shared_memory_status()] == ["st2"]
    with pytest.raises(InferenceServerException) as err:
        hc.get_system_shared_memory_status("st1")
    assert err.value.message() == "Unable to find system shared memory region: 'st1'"
    with pytest.raises(InferenceServerException) as gerr:
        gc_.get_system_shared_memory_status("st1")
    assert gerr.value.status() == "StatusCode.NOT_FOUND"
    gc_.unregister_system_shared_memory()
    assert hc.get_system_shared_memory_status() == []
    # the name is free again
    hc.register_system_shared_memory("st1", regions.key("st2"), 128)


def test_extensions_listed(hc: httpclient.InferenceServerClient) -> None:
    ext = hc.get_server_metadata()["extensions"]
    assert "system_shared_memory" in ext and "cuda_shared_memory" in ext


# ---- bad registrations --------------------------------------------------------------------------

SECRET = "the-clients-own-name"
"""A region name: Triton's texts quote the client's own region name; keys are never quoted."""
UNUSABLE = f"failed to register shared memory region '{SECRET}': invalid args"
BAD_RANGE = f"Invalid offset + byte size for shared memory region: '{SECRET}'"
BAD_OFFSET = f"Invalid offset for shared memory region: '{SECRET}'"


def test_bad_registrations(regions: Regions, server: ServerProcess) -> None:
    regions.create("reg", 64)
    key = regions.key("reg")
    base = f"/v2/systemsharedmemory/region/{SECRET}/register"
    cases: list[tuple[Any, int, str]] = [
        ({"byte_size": 8}, 400, "Shared memory register request has no 'key' field"),
        ({"key": key}, 400, "Shared memory register request has no 'byte_size' field"),
        ({"key": key, "byte_size": 0}, 400, "greater than 0"),
        ({"key": key, "byte_size": -1}, 400, "unsigned 64-bit"),
        ({"key": key, "byte_size": 2**64}, 400, "unsigned 64-bit"),
        ({"key": key, "byte_size": True}, 400, "unsigned 64-bit"),
        ({"key": key, "byte_size": "8"}, 400, "unsigned 64-bit"),
        ({"key": key, "byte_size": 8, "offset": -8}, 400, "unsigned 64-bit"),
        # too large, absent, not a file: one answer (no oracle of the object's size or existence)
        ({"key": key, "byte_size": 65}, 400, UNUSABLE),
        ({"key": key, "byte_size": 8, "offset": 60}, 400, UNUSABLE),
        ({"key": key, "byte_size": 2**63, "offset": 2**63}, 400, UNUSABLE),
        ({"key": 7, "byte_size": 8}, 400, "string 'key'"),
        ({"key": "", "byte_size": 8}, 400, "POSIX shared memory name"),
        ({"key": "/", "byte_size": 8}, 400, "POSIX shared memory name"),
        ({"key": "/a/../b", "byte_size": 8}, 400, "POSIX shared memory name"),
        ({"key": "/" + "x" * 256, "byte_size": 8}, 400, "POSIX shared memory name"),
        ({"key": f"/{KEY_PREFIX}does-not-exist", "byte_size": 8}, 400, UNUSABLE),
        ({"key": ".", "byte_size": 8}, 400, "POSIX shared memory name"),
        ({"key": "/..", "byte_size": 8}, 400, "POSIX shared memory name"),
        ([1, 2], 400, "JSON object"),
        (b"{not json", 400, "failed to parse"),
    ]
    for body, status, fragment in cases:
        code, reply = post(server, base, body)
        assert (code, fragment in reply.get("error", "")) == (status, True), (body, code, reply)
        assert key.strip("/") not in reply["error"] and KEY_PREFIX not in reply["error"]
    # the server's own segments (reserved prefix), and Triton's Python-backend prefix
    c = httpclient.InferenceServerClient(server.url)
    try:  # a tensor over the inline limit makes the server create its arena segments
        big = httpclient.InferInput("INPUT0", [65536], "FP32")
        big.set_data_from_numpy(np.zeros(65536, dtype=np.float32))
        c.infer("identity_fp32", [big])
    finally:
        c.close()
    own = sorted(server.segments())[0]
    for reserved in (own, "/" + own, "//" + own, "shoal_anything", "/triton_python_backend_shm_region_1", "sem.x"):
        code, reply = post(server, base, {"key": reserved, "byte_size": 8})
        assert code == 400 and "reserved" in reply["error"], (reserved, reply)
        assert own not in reply["error"]
    assert get(server, "/v2/systemsharedmemory/status") == (200, [])
    # registered twice under one name
    assert post(server, base, {"key": key, "byte_size": 64})[0] == 200
    code, reply = post(server, base, {"key": key, "byte_size": 32})
    # Triton's text; ALREADY_EXISTS is HTTP 400 in Triton
    assert (code, reply["error"]) == (400, f"shared memory region '{SECRET}' already in manager")
    # CUDA and system regions share one namespace; this host has no GPU to register one on
    handle = {"b64": "A" * 88}
    code, reply = post(
        server, f"/v2/cudasharedmemory/region/{SECRET}/register", {"raw_handle": handle, "device_id": 0, "byte_size": 8}
    )
    assert code == 400, reply
    code, reply = post(
        server,
        "/v2/cudasharedmemory/region/other/register",
        {"raw_handle": {"b64": "bm90IDY0IGJ5dGVz"}, "device_id": 0, "byte_size": 8},
    )
    assert code == 400 and "cudaIpcMemHandle_t" in reply["error"]
    for body in ({"device_id": 0, "byte_size": 8}, {"raw_handle": "x", "device_id": 0, "byte_size": 8}):
        assert post(server, "/v2/cudasharedmemory/region/other/register", body)[0] == 400


def test_bad_grpc_registrations(regions: Regions, gc_: grpcclient.InferenceServerClient) -> None:
    regions.create("greg", 64)
    with pytest.raises(InferenceServerException) as err:
        gc_.register_system_shared_memory(SECRET, regions.key("greg"), 128)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and UNUSABLE in str(err.value)
    assert regions.key("greg").strip("/") not in str(err.value)
    with pytest.raises(InferenceServerException) as err:
        gc_.register_system_shared_memory(SECRET, "/shoal_1_x", 8)
    assert "reserved" in str(err.value)
    with pytest.raises(InferenceServerException) as err:
        gc_.register_system_shared_memory("", regions.key("greg"), 8)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    gc_.register_system_shared_memory(SECRET, regions.key("greg"), 64)
    with pytest.raises(InferenceServerException) as err:
        gc_.register_system_shared_memory(SECRET, regions.key("greg"), 64)
    assert err.value.status() == "StatusCode.ALREADY_EXISTS"
    with pytest.raises(InferenceServerException) as err:
        gc_.register_cuda_shared_memory("cuda0", base64.b64encode(b"\x00" * 64), 0, 64)
    assert "GPUs not supported" in str(err.value)


# ---- bad references in inference requests ------------------------------------------------------


def _infer_json(server: ServerProcess, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return post(server, f"/v2/models/{model}/infer", body)


def _shm_input(name: str, region: str, size: int, offset: int | None = None, shape: list[int] | None = None) -> Any:
    params: dict[str, Any] = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset is not None:
        params["shared_memory_offset"] = offset
    return {"name": name, "datatype": "FP32", "shape": shape or [4], "parameters": params}


def test_bad_references(regions: Regions, hc: httpclient.InferenceServerClient, server: ServerProcess) -> None:
    regions.create("ref", 64)
    hc.register_system_shared_memory(SECRET, regions.key("ref"), 64)
    ok_in1 = {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}
    cases: list[tuple[Any, int, str]] = [
        (_shm_input("INPUT0", "unknown-region", 16), 404, "Unable to find shared memory region: 'unknown-region'"),
        (_shm_input("INPUT0", SECRET, 16, offset=56), 400, BAD_RANGE),
        (_shm_input("INPUT0", SECRET, 16, offset=64), 400, BAD_OFFSET),
        (_shm_input("INPUT0", SECRET, 16, offset=2**64 - 1), 400, BAD_OFFSET),
        (_shm_input("INPUT0", SECRET, 2**64 - 1), 400, BAD_RANGE),
        (_shm_input("INPUT0", SECRET, 16, offset=-1), 400, "unsigned 64-bit"),
        (_shm_input("INPUT0", SECRET, 16, offset=2**64), 400, "unsigned 64-bit"),
        (_shm_input("INPUT0", SECRET, 12), 400, "byte size mismatch"),
        (_shm_input("INPUT0", SECRET, 20), 400, "byte size mismatch"),
        (_shm_input("INPUT0", 7, 16), 400, "non-empty string"),
        (
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "parameters": {"shared_memory_region": SECRET}},
            400,
            "'shared_memory_byte_size' is required",
        ),
        (
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4],
             "parameters": {"shared_memory_region": SECRET, "shared_memory_byte_size": 16}},
            400,
            "only one of",
        ),
        (
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4],
             "parameters": {"shared_memory_offset": 0}},
            400,
            "without 'shared_memory_region'",
        ),
    ]  # fmt: skip
    for inp, status, fragment in cases:
        code, reply = _infer_json(server, "add_sub", {"inputs": [inp, ok_in1]})
        assert (code, fragment in reply.get("error", "")) == (status, True), (inp, code, reply)
        assert KEY_PREFIX not in reply["error"]
    # outputs: unknown region, out of bounds, too small for the result
    good_in0 = _shm_input("INPUT0", SECRET, 16)
    out_cases: list[tuple[dict[str, Any], int, str]] = [
        ({"shared_memory_region": "nope", "shared_memory_byte_size": 16}, 404, "Unable to find shared memory region"),
        (
            {"shared_memory_region": SECRET, "shared_memory_byte_size": 16, "shared_memory_offset": 60},
            400,
            "Invalid offset",
        ),
        ({"shared_memory_region": SECRET, "shared_memory_byte_size": 8}, 400, "should be at least 16 bytes"),
        ({"shared_memory_offset": 8}, 400, "without 'shared_memory_region'"),
    ]
    for params, status, fragment in out_cases:
        body = {"inputs": [good_in0, ok_in1], "outputs": [{"name": "OUTPUT0", "parameters": params}]}
        code, reply = _infer_json(server, "add_sub", body)
        assert (code, fragment in reply.get("error", "")) == (status, True), (params, code, reply)
        assert KEY_PREFIX not in reply["error"]
    # gRPC says the same with its codes
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        i0 = grpcclient.InferInput("INPUT0", [4], "FP32")
        i0.set_shared_memory("unknown-region", 16)
        i1 = grpcclient.InferInput("INPUT1", [4], "FP32")
        i1.set_data_from_numpy(np.ones(4, dtype=np.float32))
        with pytest.raises(InferenceServerException) as err:
            g.infer("add_sub", [i0, i1])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        i0.set_shared_memory(SECRET, 16, offset=60)
        with pytest.raises(InferenceServerException) as err:
            g.infer("add_sub", [i0, i1])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert BAD_RANGE in str(err.value)
    finally:
        g.close()
    # nothing above hurt the server or the model
    assert hc.is_server_live() and hc.is_model_ready("add_sub")


# ---- lifetime -----------------------------------------------------------------------------------


def _mapped(pid: int, key: str) -> bool:
    """The worker holds the client's object open (it copies through a descriptor)."""
    path = "/dev/shm/" + key.strip("/")
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def test_unregister_while_requests_use_the_region(regions: Regions, server: ServerProcess) -> None:
    """Requests in flight keep the region; new ones fail at once; the worker unmaps the
    region once the last request using it is done; the name can be registered again
    meanwhile and then means the new region."""
    n = 4096
    data = np.arange(n, dtype=np.float32)
    h = regions.create("busy", data.nbytes * 2)
    shm.set_shared_memory_region(h, [data])
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        g.register_system_shared_memory("busy", regions.key("busy"), data.nbytes * 2)
        results: list[Any] = []
        done = threading.Event()

        def callback(result: Any, error: Any) -> None:
            results.append(error if error is not None else result)
            if len(results) == 4:
                done.set()

        for _ in range(4):
            i0 = grpcclient.InferInput("INPUT0", [n], "FP32")
            i0.set_shared_memory("busy", data.nbytes)
            o0 = grpcclient.InferRequestedOutput("OUTPUT0")
            o0.set_shared_memory("busy", data.nbytes, offset=data.nbytes)
            g.async_infer("slow", [i0], callback, outputs=[o0], parameters={"delay_ms": 400})
        time.sleep(0.2)  # the requests are in the workers now
        pids = server.worker_pids("slow")
        assert any(_mapped(p, regions.key("busy")) for p in pids)
        g.unregister_system_shared_memory("busy")
        # a new request naming it fails at once, while the old ones still run
        i0 = grpcclient.InferInput("INPUT0", [n], "FP32")
        i0.set_shared_memory("busy", data.nbytes)
        with pytest.raises(InferenceServerException) as err:
            g.infer("slow", [i0])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        # the name can be taken again at once, by another object
        h2 = regions.create("busy2", data.nbytes * 2)
        shm.set_shared_memory_region(h2, [data * 3])
        g.register_system_shared_memory("busy", regions.key("busy2"), data.nbytes * 2)
        assert done.wait(30)
        assert all(not isinstance(r, Exception) for r in results), results
        np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [n], offset=data.nbytes), data)
        # the old mapping goes away once its requests are done
        deadline = time.monotonic() + 10
        while any(_mapped(p, regions.key("busy")) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_mapped(p, regions.key("busy")) for p in pids)
        # the re-registered name reads the new object
        i0 = grpcclient.InferInput("INPUT0", [n], "FP32")
        i0.set_shared_memory("busy", data.nbytes)
        o0 = grpcclient.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory("busy", data.nbytes, offset=data.nbytes)
        g.infer("slow", [i0], outputs=[o0])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(h2, np.float32, [n], offset=data.nbytes), data * 3)
        assert server.worker_pids("slow") == pids  # no worker died on the way
    finally:
        g.close()


def test_unregister_under_load(regions: Regions, server: ServerProcess) -> None:
    """Register / unregister in a loop while other threads infer through the region: every
    request either succeeds with the right answer or fails with NOT_FOUND; the server and
    its workers survive."""
    data = np.arange(64, dtype=np.float32)
    h = regions.create("churn", data.nbytes)
    shm.set_shared_memory_region(h, [data])
    stop = threading.Event()
    outcomes: dict[str, int] = {"ok": 0, "not_found": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def infer_loop() -> None:
        g = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            while not stop.is_set():
                i0 = grpcclient.InferInput("INPUT0", [64], "FP32")
                i0.set_shared_memory("churn", data.nbytes)
                try:
                    r = g.infer("identity_fp32", [i0])
                    ok = np.array_equal(r.as_numpy("OUTPUT0"), data)
                    with lock:
                        outcomes["ok" if ok else "wrong"] = outcomes.get("ok" if ok else "wrong", 0) + 1
                except InferenceServerException as exc:
                    with lock:
                        if exc.status() == "StatusCode.NOT_FOUND":
                            outcomes["not_found"] += 1
                        else:
                            errors.append(str(exc))
        finally:
            g.close()

    pids = server.worker_pids("identity_fp32")
    threads = [threading.Thread(target=infer_loop) for _ in range(3)]
    for t in threads:
        t.start()
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            g.register_system_shared_memory("churn", regions.key("churn"), data.nbytes)
            time.sleep(0.01)
            g.unregister_system_shared_memory("churn")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        g.close()
    assert not errors, errors[:3]
    assert outcomes.get("wrong", 0) == 0 and outcomes["ok"] > 0, outcomes
    assert server.worker_pids("identity_fp32") == pids


CLIENT_THAT_LEAVES = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    url, key = sys.argv[1], sys.argv[2]
    h = shm.create_shared_memory_region("left", key, 16)
    shm.set_shared_memory_region(h, [np.arange(4, dtype=np.float32)])
    c = httpclient.InferenceServerClient(url)
    c.register_system_shared_memory("left", key, 16)
    i0 = httpclient.InferInput("INPUT0", [4], "FP32")
    i0.set_shared_memory("left", 16)
    print(c.infer("identity_fp32", [i0]).as_numpy("OUTPUT0").tolist(), flush=True)
    # exits without unregistering (and, depending on the tritonclient version, leaves its object)
    """
)


def test_client_that_exits_without_unregistering(server: ServerProcess, hc: httpclient.InferenceServerClient) -> None:
    key = f"/{KEY_PREFIX}left"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CLIENT_THAT_LEAVES, server.url, key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]"
    try:
        # the registration outlives the client; using it is harmless either way
        assert [r["name"] for r in hc.get_system_shared_memory_status()] == ["left"]
        i0 = httpclient.InferInput("INPUT0", [4], "FP32")
        i0.set_shared_memory("left", 16)
        try:
            hc.infer("identity_fp32", [i0])
        except InferenceServerException as exc:
            assert exc.status() in ("404", "400"), exc
    finally:
        hc.unregister_system_shared_memory()
        try:
            os.unlink("/dev/shm/" + key.strip("/"))
        except FileNotFoundError:
            pass
    assert hc.is_server_ready()
    a = np.ones(4, dtype=np.float32)
    i0 = httpclient.InferInput("INPUT0", [4], "FP32")
    i0.set_data_from_numpy(a)
    np.testing.assert_array_equal(hc.infer("identity_fp32", [i0]).as_numpy("OUTPUT0"), a)


def test_truncated_segment_is_an_error_not_a_crash(regions: Regions, server: ServerProcess) -> None:
    """A client shrinks its object after registering it: the worker refuses to touch pages
    that are gone (which would be a SIGBUS) and keeps running."""
    n = 2048
    h = regions.create("shrink", n * 4)
    shm.set_shared_memory_region(h, [np.arange(n, dtype=np.float32)])
    hc = httpclient.InferenceServerClient(server.url)
    try:
        hc.register_system_shared_memory("shrink", regions.key("shrink"), n * 4)
        i0 = httpclient.InferInput("INPUT0", [n], "FP32")
        i0.set_shared_memory("shrink", n * 4)
        hc.infer("identity_fp32", [i0])  # the worker maps it now
        pids = server.worker_pids("identity_fp32")
        fd = os.open("/dev/shm/" + regions.key("shrink").strip("/"), os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        with pytest.raises(InferenceServerException) as err:
            hc.infer("identity_fp32", [i0])
        assert "smaller than when it was registered" in str(err.value)
        assert server.worker_pids("identity_fp32") == pids
    finally:
        hc.close()


# ---- switched off -------------------------------------------------------------------------------


def test_client_shm_can_be_switched_off(tmp_path: Any, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub")
    srv = ServerProcess(repo, "--allow-client-shm=false").start()
    fresh_server.append(srv)
    code, reply = post(srv, "/v2/systemsharedmemory/region/r/register", {"key": "/x", "byte_size": 8})
    assert code == 501 and "--allow-client-shm=true" in reply["error"]
    assert post(srv, "/v2/systemsharedmemory/unregister", b"")[0] == 501
    assert get(srv, "/v2/cudasharedmemory/status")[0] == 501
    in1 = {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}
    code, reply = post(srv, "/v2/models/add_sub/infer", {"inputs": [_shm_input("INPUT0", "r", 16), in1]})
    assert code == 501 and "disabled" in reply["error"]
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            g.register_system_shared_memory("r", "/x", 8)
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        g.close()
    assert srv.terminate() == 0
