"""``InstancePool``: the worker processes of one model version, and the encoding of a batch
into a worker message (inputs inline or in the router's input arena) and back."""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from shoal.proto import wire
from shoal.proto.errors import ErrorCode, ModelNotReady, ServingError
from shoal.proto.framing import overflow
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.wire import RESERVED_PARAMETERS as RESERVED_PARAMETERS
from shoal.server.dispatch.ratelimit import RateLimiter
from shoal.server.dispatch.worker import Worker, shm_outputs
from shoal.server.sharedmem import Region, SharedMemoryRegistry
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult, Lease, OutputTensor, ShmRef
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper

if TYPE_CHECKING:
    from shoal.server.tracing import Trace


class DispatchContext:
    """Router-wide resources shared by every pool: the input arena (owned here, on the
    router's loop) and the mapper of worker output arenas."""

    def __init__(
        self,
        *,
        arena: Arena,
        mapper: Mapper,
        inline_max_bytes: int,
        shm: SharedMemoryRegistry,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.arena = arena
        self.mapper = mapper
        self.inline_max_bytes = inline_max_bytes
        self.shm = shm
        self.limiter = limiter
        """``--rate-limit execution_count``: instances execute only while holding their resources."""
        self.cuda_segments: dict[str, tuple[int, bytes, int]] = {}
        """Workers' CUDA arena segments seen in replies: name -> (region id, IPC handle, size). The
        next ensemble step's worker opens one as it does a client's CUDA region, under that id
        (``forget_cuda`` when the worker exits)."""
        self._cuda_ids = itertools.count(1 << 62)  # apart from the client regions' ids

    def cuda_segment(self, name: str, handle: bytes, nbytes: int) -> None:
        if name not in self.cuda_segments:
            self.cuda_segments[name] = (next(self._cuda_ids), handle, nbytes)

    def forget_cuda(self, prefix: str) -> list[int]:
        """Drop the CUDA segments of the worker whose arenas start with ``prefix``; their ids."""
        gone = [name for name in self.cuda_segments if name.startswith(prefix)]
        return [self.cuda_segments.pop(name)[0] for name in gone]


class InstancePool:
    def __init__(self, workers: list[Worker], ctx: DispatchContext, stats: ModelStats | None = None) -> None:
        self.workers = workers
        self.ctx = ctx
        self.stats = stats

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    def pick(self) -> Worker:
        """The READY worker with the fewest unfinished batches (``Worker.load``: a decoupled
        model's streams count until their final response)."""
        best: Worker | None = None
        least = 0
        for w in self.workers:
            if w.ready:
                load = w.load
                if best is None or load < least:
                    best, least = w, load
        if best is None:
            raise ModelNotReady("no instance of the model is ready")
        return best

    async def run(
        self, batch: Sequence[InferRequest], worker: Worker | None = None
    ) -> list[InferResult | ServingError]:
        """Execute ``batch`` on one instance; one result or error per request, in order.

        Raises ``ServingError`` when the whole batch failed (no ready instance, worker died).
        """
        if worker is None:
            worker = self.pick()
        elif not worker.ready:
            raise ModelNotReady(f"{worker.label} is not ready")
        limiter, needs = self.ctx.limiter, worker.rate
        if limiter is not None and needs is not None:
            await limiter.acquire(needs)
            if not worker.ready:
                limiter.release(needs)
                raise ModelNotReady(f"{worker.label} is not ready")
            return await self._run(batch, worker, _once(functools.partial(limiter.release, needs)))
        return await self._run(batch, worker, None)

    async def _run(
        self, batch: Sequence[InferRequest], worker: Worker, held: Callable[[], None] | None
    ) -> list[InferResult | ServingError]:
        """``held``: gives the rate limiter's resources back once the worker is done."""
        env = wire.envelope(0)
        buffers: list[Any] = []
        blocks: list[Block] = []
        regions: list[Region] = []
        leases: list[Lease] = []
        try:
            traced = self._encode(batch, env.infer, buffers, blocks, regions, leases, worker.spec.instance_name)
            # Input blocks are freed (and client regions and other workers' outputs given
            # back) when the worker is done with them, which is later than this coroutine if
            # the client goes away (the future is then cancelled but the worker still reads).
            settle = (lambda: self._free(blocks, regions, leases)) if blocks or regions or leases else None
            if held is not None:
                settle = _both(settle, held)
            stream = _Stream(self, worker, batch) if batch[0].responses is not None else None
            sent_ns = time.monotonic_ns() if traced else 0
            fut = worker.submit(env, buffers, settle, stream)
            rid = env.request_id
            for i, req in enumerate(batch):
                req.cancel = functools.partial(worker.cancel, rid, i)
                if stream is not None:
                    req.ack = functools.partial(worker.ack, rid, i)
        except BaseException:
            self._free(blocks, regions, leases)
            if held is not None:
                held()
            raise
        try:
            reply, frames = await fut
        finally:
            del fut  # a future that failed holds the error, whose traceback holds this frame
        results = self._decode(batch, worker, reply, frames, decoupled=stream is not None)
        if traced:
            for req in batch:
                if req.trace is not None:
                    _trace_compute(req.trace, sent_ns, reply.infer_done)
        return results

    def _free(self, blocks: list[Block], regions: list[Region], leases: list[Lease]) -> None:
        arena = self.ctx.arena
        for b in blocks:
            arena.free(b)
        registry = self.ctx.shm
        for r in regions:
            registry.release(r)
        for lease in leases:
            lease.drop()
        regions.clear()
        blocks.clear()
        leases.clear()

    def _encode(
        self,
        batch: Sequence[InferRequest],
        infer: wpb.Infer,
        buffers: list[Any],
        blocks: list[Block],
        regions: list[Region],
        leases: list[Lease],
        instance: str = "",
    ) -> bool:
        """Fill ``infer``; returns whether a request of the batch is traced."""
        traced = False
        inline_max = self.ctx.inline_max_bytes
        arena = self.ctx.arena
        for i, req in enumerate(batch):
            req.instance = instance
            r = infer.requests.add()
            r.id = i
            r.request_id = req.id
            if req.correlation_id:
                if isinstance(req.correlation_id, str):
                    r.correlation_id_str = req.correlation_id
                else:
                    r.correlation_id = req.correlation_id
            r.flags = req.flags
            if req.trace is not None:
                r.trace_id = req.trace.id
                traced = True
            for t in req.inputs:
                ref = r.inputs.add()
                ref.name = t.name
                ref.datatype = t.datatype
                ref.shape.extend(t.shape)
                if t.shm is not None:
                    _use_region(t.shm, self.ctx.shm, regions, ref.client)
                    continue
                if t.arena is not None:  # another worker's output: read in place
                    t.arena.lease.hold()
                    leases.append(t.arena.lease)
                    if t.arena.block.device >= 0:
                        self._describe_cuda(t.arena.block, ref.client)
                    else:
                        _describe(t.arena.block, ref.shm)
                    continue
                n = len(t.data)
                block = None
                if n > inline_max:
                    try:
                        block = arena.allocate(n)
                    except ServingError as exc:
                        overflow(buffers, n, exc, "an input")
                if block is None:  # small, or the arena has no room: in the message
                    ref.frame = len(buffers)
                    buffers.append(t.data)
                else:
                    blocks.append(block)
                    view = arena.view(block)
                    view[:] = t.data
                    view.release()
                    _describe(block, ref.shm)
            if req.outputs is not None:
                for o in req.outputs:
                    r.outputs.append(o.name)
                    if o.shm is not None:
                        _use_region(o.shm, self.ctx.shm, regions, r.output_shm[o.name])
                    elif o.on_gpu:
                        r.device_outputs.append(o.name)
            params = {k: v for k, v in req.parameters.items() if k not in RESERVED_PARAMETERS}
            if params:
                r.parameters_json = json.dumps(params)
        return traced

    def _describe_cuda(self, block: Block, out: wpb.ClientShm) -> None:
        """A block of a worker's CUDA arena as the CUDA region the reading worker opens."""
        known = self.ctx.cuda_segments.get(block.region)
        if known is None:  # its worker exited (forget_cuda) while a step still held it
            raise ServingError(
                f"the GPU memory of tensor block '{block.region}' is gone (its instance exited)",
                code=ErrorCode.UNAVAILABLE,
            )
        out.region_id, out.cuda_handle, out.region_bytes = known
        out.device = block.device
        out.region_offset = 0
        out.offset = block.offset
        out.nbytes = block.nbytes

    def _decode(
        self,
        batch: Sequence[InferRequest],
        worker: Worker,
        reply: wpb.Envelope,
        frames: list[bytes],
        *,
        decoupled: bool = False,
    ) -> list[InferResult | ServingError]:
        """The batch's results; a decoupled batch's responses went to each request's sink, so
        its InferDone has none and each result here is empty."""
        body = reply.WhichOneof("body")
        if body == "failed":
            raise wire.to_error(reply.failed)
        expected = 0 if decoupled else len(batch)
        if body != "infer_done" or len(reply.infer_done.results) != expected:
            if body == "infer_done":  # the output blocks it names go back, or they stay allocated
                worker.release(worker.identity, shm_outputs(reply.infer_done))
            raise ServingError(f"{worker.label}: malformed reply", code=ErrorCode.INTERNAL)
        done = reply.infer_done
        if self.stats is not None:
            rows = inferences = requests = 0
            for r in batch:
                rows += r.batch_size
                if not r.null:  # filler rows of the sequence batcher count in the batch size only
                    inferences += r.batch_size
                    requests += 1
            self.stats.execution(
                inferences, requests, done.compute_input_ns, done.compute_infer_ns, done.compute_output_ns, rows
            )
        results: list[InferResult | ServingError]
        if decoupled:
            results = [InferResult(req.model_name, req.model_version, [], id=req.id) for req in batch]
        else:
            results = [self.result(req, worker, res, frames) for req, res in zip(batch, done.results, strict=True)]
        for i in done.rescheduled:
            res = results[i] if i < len(results) else None
            if isinstance(res, InferResult):
                res.rescheduled = True
        return results

    def result(
        self, req: InferRequest, worker: Worker, res: wpb.Result, frames: list[bytes]
    ) -> InferResult | ServingError:
        """One request's result as the worker described it (outputs in frames, in its arena,
        or written into the client's region), or its error."""
        if res.HasField("error"):
            return wire.to_error(res.error)
        identity = worker.identity
        tensors = []
        held: list[wpb.ShmSlice] = []
        try:
            for ref in res.outputs:
                where = ref.WhichOneof("location")
                if where == "client":
                    written = ref.client.nbytes
                    tensors.append(OutputTensor(ref.name, ref.datatype, tuple(ref.shape), b"", True, written))
                    continue
                if where == "shm":
                    s = ref.shm
                    block = Block(s.region, s.offset, s.nbytes, s.device)
                    held.append(s)  # given back even when it cannot be mapped
                    data: Any
                    if s.device >= 0:  # in the worker's CUDA arena: only the next step reads it
                        if not s.cuda_handle or s.offset + s.nbytes > s.segment_bytes:
                            raise ServingError(f"{worker.label}: malformed reply (GPU output '{ref.name}')")
                        self.ctx.cuda_segment(s.region, s.cuda_handle, s.segment_bytes)
                        data = b""
                    else:
                        data = self.ctx.mapper.view(block)
                    tensors.append(OutputTensor(ref.name, ref.datatype, tuple(ref.shape), data, arena=block))
                elif ref.frame < len(frames):
                    tensors.append(OutputTensor(ref.name, ref.datatype, tuple(ref.shape), frames[ref.frame]))
                else:
                    raise ServingError(
                        f"{worker.label}: malformed reply (output '{ref.name}' names a missing frame)",
                        code=ErrorCode.INTERNAL,
                    )
        except ServingError as exc:
            worker.release(identity, held)
            return exc
        result = InferResult(
            model_name=req.model_name,
            model_version=req.model_version,
            outputs=tensors,
            id=req.id,
            parameters=json.loads(res.parameters_json) if res.parameters_json else {},
        )
        if held:
            result.release = _releaser(worker, identity, held)
        return result


class _Stream:
    """A decoupled batch's responses, passed to each request's ``responses`` sink as they
    arrive (``StreamSink`` of ``Worker``)."""

    __slots__ = ("pool", "worker", "batch", "open")

    def __init__(self, pool: InstancePool, worker: Worker, batch: Sequence[InferRequest]) -> None:
        self.pool = pool
        self.worker = worker
        self.batch = batch
        self.open = set(range(len(batch)))

    @property
    def closed(self) -> bool:
        return not self.open

    def on(self, index: int, result: wpb.Result | None, frames: list[bytes], final: bool) -> None:
        if index not in self.open:
            if result is not None:  # a response after the final one (or for no request): dropped
                late = self.pool.result(self.batch[0], self.worker, result, frames)
                if isinstance(late, InferResult):
                    late.done()
            return
        req = self.batch[index]
        item = None if result is None else self.pool.result(req, self.worker, result, frames)
        if final:
            self.open.discard(index)
        sink = req.responses
        if sink is None:
            if isinstance(item, InferResult):
                item.done()
            return
        sink(item, final)

    def ended(self, indexes: Iterable[int]) -> None:
        self.open.difference_update(indexes)

    def fail(self, err: ServingError) -> None:
        open_, self.open = self.open, set()
        for index in sorted(open_):
            sink = self.batch[index].responses
            if sink is not None:
                sink(err, True)


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call


def _both(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    def settle() -> None:
        if first is not None:
            first()
        then()

    return settle


def _trace_compute(trace: Trace, sent_ns: int, done: wpb.InferDone) -> None:
    """COMPUTE_* of a traced request: the batch's send and reply times here and the
    durations the worker measured (``server.tracing``)."""
    trace.compute(sent_ns, time.monotonic_ns(), done.compute_input_ns, done.compute_infer_ns, done.compute_output_ns)


def _describe(block: Block, out: wpb.ShmSlice) -> None:
    out.region, out.offset, out.nbytes, out.device = block.region, block.offset, block.nbytes, block.device


def _use_region(ref: ShmRef, registry: SharedMemoryRegistry, regions: list[Region], out: wpb.ClientShm) -> None:
    """Count one more use of a bound client region (given back in ``_free``) and describe
    the tensor's place in it for the worker."""
    region = ref.region
    assert region is not None, "shared-memory reference not bound"
    registry.hold(region)
    regions.append(region)
    region.descriptor(ref.offset, ref.byte_size, out)


def _releaser(worker: Worker, identity: bytes, held: list[wpb.ShmSlice]) -> Any:
    def release() -> None:
        worker.release(identity, held)

    return release
