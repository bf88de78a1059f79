"""The router's side of the CUDA arena (``server/dispatch/pool.py``), which CI can run without
a GPU: a worker's reply naming a block of its CUDA arena is never mapped (the router has no
CUDA), its segment's handle is remembered, the next step gets the block as a CUDA region
(``ClientShm``) under an id of the router's own, and a segment whose worker exited is
refused with a clear error. The GPU side runs in ``tests/gpu/test_cuda_arena.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.pool import DispatchContext, InstancePool
from shoal.server.sharedmem import SharedMemoryRegistry
from shoal.server.types import ArenaRef, InferRequest, InferResult, InputTensor, Lease, RequestedOutput
from shoal.shm.arena import Arena
from shoal.shm.mapper import Mapper

SEGMENT = "shoal_1_w7_cuda0"
HANDLE = bytes(range(64))


@dataclass
class _Worker:
    """What ``InstancePool.result`` uses of a worker: its label, identity and ``release``."""

    label: str = "model 'pre' instance 'pre_0'"
    identity: bytes = b"w7"
    released: list[list[wpb.ShmSlice]] = field(default_factory=list)

    def release(self, identity: bytes, blocks: list[wpb.ShmSlice]) -> None:
        self.released.append(list(blocks))


@pytest.fixture
def pool() -> Any:
    arena = Arena("shoal_test_cudablocks", segment_bytes=1 << 16, max_bytes=1 << 16)
    ctx = DispatchContext(arena=arena, mapper=Mapper(), inline_max_bytes=32 << 10, shm=SharedMemoryRegistry())
    yield InstancePool([], ctx)
    arena.close()


def _reply(offset: int = 512, nbytes: int = 4000, handle: bytes = HANDLE) -> wpb.Result:
    res = wpb.Result()
    ref = res.outputs.add()
    ref.name, ref.datatype = "X", "FP32"
    ref.shape.append(nbytes // 4)
    s = ref.shm
    s.region, s.offset, s.nbytes, s.device = SEGMENT, offset, nbytes, 0
    s.cuda_handle, s.segment_bytes = handle, 1 << 20
    return res


def test_a_gpu_output_is_not_mapped_and_goes_on_as_a_cuda_region(pool: Any) -> None:
    worker = _Worker()
    got = pool.result(InferRequest("pre", 1, []), worker, _reply(), [])
    assert isinstance(got, InferResult)
    (out,) = got.outputs
    assert out.data == b"" and out.arena is not None and out.arena.device == 0
    assert not pool.ctx.mapper._segments  # the router never opened it
    region_id, handle, size = pool.ctx.cuda_segments[SEGMENT]
    assert region_id >= 1 << 62 and handle == HANDLE and size == 1 << 20

    dropped: list[bool] = []
    lease = Lease(lambda: dropped.append(True))
    step = InputTensor("IN", "FP32", (1000,), out.data, arena=ArenaRef(out.arena, lease))
    assert step.nbytes == 4000  # what validation checks: the block's size, not the empty data
    infer, blocks, regions, leases = wpb.Infer(), [], [], []  # type: ignore[var-annotated]
    pool._encode([InferRequest("net", 1, [step], outputs=[RequestedOutput("OUT", on_gpu=True)])], infer, [], blocks,
                 regions, leases)  # fmt: skip
    (req,) = infer.requests
    ref = req.inputs[0]
    assert ref.WhichOneof("location") == "client"
    c = ref.client
    assert (c.region_id, c.cuda_handle, c.device) == (region_id, HANDLE, 0)
    assert (c.region_offset, c.region_bytes, c.offset, c.nbytes) == (0, 1 << 20, 512, 4000)
    assert list(req.device_outputs) == ["OUT"]
    assert leases == [lease] and lease.held  # the step holds the producer's block until it is done
    got.done()  # the producer's result gives its blocks back through its worker
    assert [s.region for s in worker.released[0]] == [SEGMENT]


def test_a_gpu_output_without_its_handle_is_a_malformed_reply(pool: Any) -> None:
    worker = _Worker()
    got = pool.result(InferRequest("pre", 1, []), worker, _reply(handle=b""), [])
    assert isinstance(got, ServingError) and "malformed reply (GPU output 'X')" in got.message
    assert [s.region for s in worker.released[0]] == [SEGMENT]  # given back all the same
    outside = pool.result(InferRequest("pre", 1, []), _Worker(), _reply(offset=(1 << 20) - 100), [])
    assert isinstance(outside, ServingError)
    assert SEGMENT not in pool.ctx.cuda_segments


def test_a_segment_of_an_exited_worker_is_refused_by_name(pool: Any) -> None:
    got = pool.result(InferRequest("pre", 1, []), _Worker(), _reply(), [])
    assert isinstance(got, InferResult)
    region_id = pool.ctx.cuda_segments[SEGMENT][0]
    assert pool.ctx.forget_cuda("shoal_1_w70_cuda") == []  # another worker's prefix
    assert pool.ctx.forget_cuda("shoal_1_w7_cuda") == [region_id]
    step = InputTensor("IN", "FP32", (1000,), b"", arena=ArenaRef(got.outputs[0].arena, Lease(lambda: None)))
    with pytest.raises(ServingError) as err:
        pool._encode([InferRequest("net", 1, [step])], wpb.Infer(), [], [], [], [])
    assert err.value.code == ErrorCode.UNAVAILABLE
    assert f"tensor block '{SEGMENT}' is gone (its instance exited)" in err.value.message
