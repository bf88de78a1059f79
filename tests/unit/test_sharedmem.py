"""``SharedMemoryRegistry``: keys, bounds, one namespace, and the reference counting that
makes unregistering a region in use safe (workers are told to unmap it exactly once, after
the last request using it)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import posix_ipc
import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.sharedmem import SharedMemoryRegistry
from shoal.server.shmkeys import normalize_key, shm_params
from shoal.server.types import InferRequest, InputTensor, RequestedOutput, ShmRef

KEY = f"shoaltest_{os.getpid()}_unit"


@pytest.fixture
def segment() -> Iterator[str]:
    obj = posix_ipc.SharedMemory("/" + KEY, posix_ipc.O_CREX, size=4096)
    obj.close_fd()
    yield "/" + KEY
    posix_ipc.unlink_shared_memory("/" + KEY)


@pytest.fixture
def registry() -> tuple[SharedMemoryRegistry, list[list[int]]]:
    forgotten: list[list[int]] = []
    reg = SharedMemoryRegistry(gpu_count=lambda: 2)
    reg.on_forget = lambda ids: forgotten.append(list(ids))
    return reg, forgotten


@pytest.mark.parametrize("key", ["shoal_123_abc", "/shoal_x", "//triton_python_backend_shm_region_9", "sem.lock"])
def test_reserved_keys(key: str) -> None:
    with pytest.raises(ServingError, match="reserved"):
        normalize_key(key)


@pytest.mark.parametrize("key", ["", "/", "a/b", "/a\x00b", "x" * 256, ".", "/.."])
def test_malformed_keys(key: str) -> None:
    with pytest.raises(ServingError, match="POSIX shared memory name"):
        normalize_key(key)


def test_key_spellings() -> None:
    assert normalize_key("/input") == normalize_key("input") == normalize_key("//input") == "input"


def test_register_bounds_and_namespace(segment: str, registry: tuple[SharedMemoryRegistry, list[list[int]]]) -> None:
    reg, _ = registry
    with pytest.raises(ServingError, match="^failed to register shared memory region 'r': invalid args$"):
        reg.register_system("r", segment, 4000, 97)
    r = reg.register_system("r", segment, 4000, 96)
    assert (r.key, r.key_given, r.offset, r.byte_size) == (KEY, segment, 4000, 96)
    handle = base64.b64encode(b"\x01" * 64).decode()
    with pytest.raises(ServingError) as err:
        reg.register_cuda("r", handle, 0, 8)  # one namespace for both kinds
    assert err.value.code is ErrorCode.ALREADY_EXISTS
    assert err.value.message == "shared memory region 'r' already in manager"
    assert reg.status(None, cuda=False) == [r] and reg.status(None, cuda=True) == []
    with pytest.raises(ServingError) as err:
        reg.status("r", cuda=True)
    assert err.value.code is ErrorCode.NOT_FOUND
    assert err.value.message == "The region named 'r' is registered as system shared memory, not CUDA shared memory"
    with pytest.raises(ServingError) as err:
        reg.status("q", cuda=True)
    assert (err.value.code, err.value.message) == (
        ErrorCode.NOT_FOUND,
        "Unable to find cuda shared memory region: 'q'",
    )


def test_cuda_handle_base64_with_line_breaks(registry: tuple[SharedMemoryRegistry, list[list[int]]]) -> None:
    """perf_analyzer's base64 (libb64) has a line break every 72 characters."""
    reg, _ = registry
    text = base64.b64encode(bytes(range(64))).decode()
    wrapped = text[:72] + "\n" + text[72:] + "\n"
    r = reg.register_cuda("c", wrapped, 1, 128)
    assert r.raw_handle == bytes(range(64)) and r.cuda
    with pytest.raises(ServingError, match="device_id 2"):
        reg.register_cuda("d", text, 2, 128)
    with pytest.raises(ServingError, match="cudaIpcMemHandle_t"):
        reg.register_cuda("e", base64.b64encode(b"short").decode(), 0, 128)
    with pytest.raises(ServingError, match="cudaIpcMemHandle_t"):
        reg.register_cuda("e", "not base64!", 0, 128)


def test_no_gpu_refuses_cuda() -> None:
    reg = SharedMemoryRegistry(gpu_count=lambda: 0)
    with pytest.raises(ServingError, match="GPUs not supported"):
        reg.register_cuda("c", bytes(64), 0, 8)


def _request(*refs: ShmRef) -> InferRequest:
    inputs = [InputTensor(f"IN{i}", "UINT8", (ref.byte_size,), b"", shm=ref) for i, ref in enumerate(refs)]
    return InferRequest("m", 1, inputs, outputs=[RequestedOutput("OUT")])


def test_unregister_in_use_defers_forget(segment: str, registry: tuple[SharedMemoryRegistry, list[list[int]]]) -> None:
    reg, forgotten = registry
    r = reg.register_system("r", segment, 0, 4096)
    req = _request(ShmRef("r", 0, 16), ShmRef("r", 16, 16))
    reg.bind(req)
    assert r.users == 2 and req.shm_regions == [r, r]
    reg.unregister("r", cuda=False)
    assert forgotten == [] and reg.status(None, cuda=False) == []
    # the name is free at once and names a new registration
    r2 = reg.register_system("r", segment, 0, 64)
    assert r2.id != r.id
    reg.release(r)
    assert forgotten == []
    reg.unbind(req)
    assert forgotten == [[r.id]] and req.shm_regions == []
    reg.unbind(req)  # idempotent
    assert forgotten == [[r.id]]
    reg.unregister(None, cuda=False)
    assert forgotten == [[r.id], [r2.id]]


def test_bind_failure_keeps_nothing(segment: str, registry: tuple[SharedMemoryRegistry, list[list[int]]]) -> None:
    reg, _ = registry
    r = reg.register_system("r", segment, 0, 32)
    req = _request(ShmRef("r", 0, 16), ShmRef("r", 16, 17))
    with pytest.raises(ServingError) as err:
        reg.bind(req)
    assert err.value.message == "Invalid offset + byte size for shared memory region: 'r'"
    assert r.users == 0
    with pytest.raises(ServingError) as err:
        reg.bind(_request(ShmRef("r", 32, 0)))
    assert err.value.message == "Invalid offset for shared memory region: 'r'"
    assert r.users == 0
    with pytest.raises(ServingError) as nf:
        reg.bind(_request(ShmRef("nope", 0, 1)))
    assert nf.value.code is ErrorCode.NOT_FOUND
    assert nf.value.message == "Unable to find shared memory region: 'nope'"


def test_disabled_registry(segment: str) -> None:
    reg = SharedMemoryRegistry(allowed=False)
    for call in (
        lambda: reg.register_system("r", segment, 0, 8),
        lambda: reg.status(None, cuda=False),
        lambda: reg.unregister(None, cuda=True),
        lambda: reg.bind(_request(ShmRef("r", 0, 1))),
    ):
        with pytest.raises(ServingError, match="--allow-client-shm=true") as err:
            call()
        assert err.value.code is ErrorCode.UNIMPLEMENTED


def test_shm_params() -> None:
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 4, "other": 1}
    ref = shm_params(params, "input 'x'")
    assert ref is not None and (ref.region_name, ref.byte_size, ref.offset) == ("r", 8, 4)
    assert params == {"other": 1}
    assert shm_params({"a": 1}, "input 'x'") is None
    with pytest.raises(ServingError, match="without 'shared_memory_region'"):
        shm_params({"shared_memory_byte_size": 8}, "input 'x'")
