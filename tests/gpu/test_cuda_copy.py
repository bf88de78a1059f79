"""``workers.cudacopy.SegmentCopier``: a batch's device-to-device copies in one kernel launch,
and ``ClientRegions.write_cuda``'s copies of device outputs, made a batch at a time by
``finish_writes``. Every byte lands where it should, aligned or not, across several
launches in turn (the pinned tables are reused only once read). And
``workers.backends.ortstaging.PinnedStaging`` (a GPU onnxruntime instance's pinned staging),
which copies a batch's inputs up through it: read into the staging from client shared memory,
or joined into it from the requests' bodies, each comes out on the device in order, padded.
Run with ``scripts/gpu_check`` on the device machine."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA GPU", allow_module_level=True)
except cupy.cuda.runtime.CUDARuntimeError:
    pytest.skip("no CUDA GPU", allow_module_level=True)

from shoal.proto.gen import worker_pb2 as wpb  # noqa: E402
from shoal.workers import cudacopy  # noqa: E402
from shoal.workers.backends import ortstaging  # noqa: E402
from shoal.workers.clientshm import ClientRegions  # noqa: E402
from shoal.workers.devview import DeviceView  # noqa: E402


def _plan(rng: np.random.Generator, count: int, space: int) -> list[tuple[int, int, int]]:
    """(destination offset, source offset, bytes) of ``count`` disjoint copies."""
    out = []
    dst = src = 0
    for _ in range(count):
        n = int(rng.choice([0, 1, 3, 16, 17, 4000, 4096, 65536 + 5, 602112]))
        dst += int(rng.integers(0, 2)) * int(rng.integers(0, 17))
        src += int(rng.integers(0, 2)) * int(rng.integers(0, 17))
        assert dst + n <= space and src + n <= space
        out.append((dst, src, n))
        dst += n
        src += n
    return out


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_segments_land_where_they_should(count: int) -> None:
    rng = np.random.default_rng(count)
    space = 64 * 700_000
    src = cupy.asarray(rng.integers(0, 256, space, dtype=np.uint8))
    dst = cupy.zeros(space, dtype=cupy.uint8)
    copier = cudacopy.SegmentCopier()
    stream = cupy.cuda.Stream(non_blocking=True)
    expect = np.zeros(space, dtype=np.uint8)
    host_src = cupy.asnumpy(src)
    launches = 0
    for _round in range(6):  # more rounds than pinned tables: each is reused once read
        plan = _plan(rng, count, space)
        segments = [(dst.data.ptr + d, src.data.ptr + s, n) for d, s, n in plan]
        copier.copy(segments, stream)
        launches += sum(1 for _, _, n in plan if n) >= cudacopy.MIN_SEGMENTS
        for d, s, n in plan:
            expect[d : d + n] = host_src[s : s + n]
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(dst), expect)
    assert copier.launches == launches


def test_more_segments_than_a_grid_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of more copies than one grid's rows takes several launches."""
    monkeypatch.setattr(cudacopy, "MAX_GRID_Y", 4)
    src = cupy.arange(100, dtype=cupy.float32)
    dst = cupy.zeros(100, dtype=cupy.float32)
    copier = cudacopy.SegmentCopier()
    stream = cupy.cuda.Stream(non_blocking=True)
    copier.copy([(dst.data.ptr + 4 * i, src.data.ptr + 4 * (99 - i), 4) for i in range(10)], stream)
    stream.synchronize()
    assert copier.launches == 3
    np.testing.assert_array_equal(cupy.asnumpy(dst[:10]), np.arange(99, 89, -1, dtype=np.float32))


def test_write_cuda_copies_a_batch_in_one_launch() -> None:
    """Eight outputs (rows of one batch's array: four CuPy slices, four ``DeviceView`` rows
    as the PyTorch backend's outputs come), one not contiguous and one host array, written
    into a CUDA region: the device ones land only at ``finish_writes``, in one launch; the
    region reads back through ``device_view``. A process cannot open its own IPC handle, so
    a child process plays the worker."""
    import multiprocessing as mp

    shared = cupy.zeros(10 * 1000, dtype=cupy.float32)
    with mp.get_context("spawn").Pool(1) as pool:
        launches, early, back = pool.apply(_write_in_child, (cupy.cuda.runtime.ipcGetMemHandle(shared.data.ptr),))
    expect = np.concatenate([np.arange(8000), np.arange(0, 2000, 2), np.full(1000, 7)]).astype(np.float32)
    np.testing.assert_array_equal(cupy.asnumpy(shared), expect)
    assert launches == 1, "the device copies took more than one launch"
    assert early == 0.0, "a device copy was made before finish_writes"
    np.testing.assert_array_equal(back, expect[4000:5000].reshape(10, 100))


def _write_in_child(handle: bytes) -> tuple[int, float, np.ndarray]:
    regions = ClientRegions()
    nbytes = 10 * 1000 * 4

    def dest(offset: int) -> wpb.ClientShm:
        return wpb.ClientShm(region_id=1, device=0, cuda_handle=handle, region_bytes=nbytes, offset=offset, nbytes=4000)

    rows = cupy.arange(8 * 1000, dtype=cupy.float32).reshape(8, 1000)
    view = DeviceView(rows.data.ptr, (8, 1000), np.dtype(np.float32), 0, rows)
    for i in range(8):
        regions.write_cuda(dest(4000 * i), rows[i : i + 1] if i < 4 else view[i : i + 1], 4000)
    regions.write_cuda(dest(32000), cupy.arange(2000, dtype=cupy.float32)[::2], 4000)
    cupy.cuda.Device(0).synchronize()
    early = np.empty(1, dtype=np.float32)
    ptr = regions._cuda_region(dest(0)).ptr
    cupy.cuda.runtime.memcpy(early.ctypes.data, ptr + 4, 4, cupy.cuda.runtime.memcpyDefault)
    regions.write_cuda(dest(36000), np.full(1000, 7, dtype=np.float32), 4000)
    regions.finish_writes()
    launches = regions._copier.launches
    back = regions.device_view(dest(16000), np.dtype(np.float32), (10, 100)).get()
    regions.close()
    return launches, float(early[0]), back


@pytest.mark.parametrize("pad", [0, 3])
def test_body_inputs_are_joined_in_the_pinned_staging(monkeypatch: pytest.MonkeyPatch, pad: int) -> None:
    """A batch whose X came in the requests' bodies (not read into the staging) and whose Y
    was read into the staging request by request: X is joined into the staging (on threads:
    the threshold lowered) and each input goes up, padded with zero rows. First batch: X
    grows the buffer past its first MiB; Y's rows (even counts of 8-byte rows, so each
    request's rows start where the last one's end) stay in the outgrown buffer and go up from
    there. Second batch: the grown buffer holds both; Y's rows are not adjacent (after the one
    odd count a request's rows start at the next 16 bytes), so the staged bytes go up as one
    piece and are sorted on the device. String inputs are left to the host."""
    monkeypatch.setattr(ortstaging, "PARALLEL_BYTES", 1024)
    staging = ortstaging.PinnedStaging()
    rng = np.random.default_rng(pad)
    for rows in ((100, 300, 2, 250, 550), (100, 300, 1, 250, 551)):  # X: 1.2 MB, past the first 1 MiB
        staging.begin()
        xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in rows]
        ys = []
        for n in rows:
            y = np.frombuffer(staging.take(n * 8), dtype=np.int32).reshape(n, 2)
            y[...] = rng.integers(-1000, 1000, (n, 2))
            ys.append(y)
        ys_copy = [y.copy() for y in ys]
        got = staging.batch_inputs({"X": xs, "Y": ys}, pad)
        assert got is not None
        want_x = np.concatenate([*xs, np.zeros((pad, 256), np.float32)])
        want_y = np.concatenate([*ys_copy, np.zeros((pad, 2), np.int32)])
        np.testing.assert_array_equal(cupy.asnumpy(got["X"]), want_x)
        np.testing.assert_array_equal(cupy.asnumpy(got["Y"]), want_y)
    staging.begin()
    words = [np.array([[b"a"]], dtype=np.object_), np.array([[b"bc"]], dtype=np.object_)]
    assert staging.batch_inputs({"S": words}, 0) is None
