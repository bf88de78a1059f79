"""Transport-neutral request and response types: what frontends decode into and encode from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.shm.block import Block

if TYPE_CHECKING:
    from shoal.proto.errors import ServingError

if TYPE_CHECKING:
    from shoal.server.peers import Peer
    from shoal.server.sharedmem import Region
    from shoal.server.tracing import Trace

Buffer = bytes | bytearray | memoryview


class UseProxy(Exception):
    """(a frontend process) Send this request through the router's own frontend, which has
    what the frontend lacks: the model's metadata, or the trace it decided to take."""


class Lease:
    """Counts the holders of a result whose outputs other requests read in place (ensemble
    steps): ``release`` runs when the last holder drops it."""

    __slots__ = ("_count", "_release")

    def __init__(self, release: Callable[[], None]) -> None:
        self._count = 1
        self._release: Callable[[], None] | None = release

    def hold(self) -> None:
        self._count += 1

    @property
    def held(self) -> bool:
        """Some holder has not dropped it yet."""
        return self._count > 0

    def drop(self) -> None:
        self._count -= 1
        if self._count == 0 and self._release is not None:
            release, self._release = self._release, None
            release()


@dataclass(frozen=True, slots=True)
class ArenaRef:
    """Tensor bytes already in a worker's output arena (an earlier ensemble step's output):
    the next worker reads them there, kept alive by ``lease``."""

    block: Block
    lease: Lease


@dataclass(slots=True)
class ShmRef:
    """A tensor placed in a client shared-memory region: the request's
    ``shared_memory_region`` / ``_offset`` / ``_byte_size`` parameters. ``region`` is set
    once the registry has resolved and bounds-checked it."""

    region_name: str
    offset: int
    byte_size: int
    region: Region | None = None


@dataclass(slots=True)
class InputTensor:
    """One request input. ``data`` holds raw little-endian bytes (BYTES length-prefixed)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Buffer
    parameters: dict[str, Any] = field(default_factory=dict)
    shm: ShmRef | None = None
    """Set when the bytes are in client shared memory (``data`` is then empty)."""
    arena: ArenaRef | None = None
    """Set when ``data`` is a view of a worker's output arena that the next worker may read
    in place (no copy through the router)."""

    @property
    def nbytes(self) -> int:
        if self.shm is not None:
            return self.shm.byte_size
        if self.arena is not None and self.arena.block.device >= 0:
            return self.arena.block.nbytes  # an earlier step's output left on the GPU
        return len(self.data)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    shm: ShmRef | None = None
    """Set when the output is to be written into client shared memory."""
    on_gpu: bool = False
    """A GPU instance may leave it in its CUDA arena (an ensemble step whose readers all run
    on GPUs); the router then never reads its bytes."""


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: int
    """``-1``: the version policy chooses (highest READY version)."""
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None
    """``None``: every output of the model."""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    """Batch elements of the request (dimension 0 of batching models; 1 otherwise)."""
    correlation_id: int | str = 0
    """Sequence id (set by the sequence batcher)."""
    flags: int = 0
    """Triton's request flags: 1 = sequence start, 2 = sequence end."""
    null: bool = False
    """A filler for an empty sequence slot: executed, not counted, its result dropped."""
    shm_regions: list[Region] = field(default_factory=list)
    """Client regions this request holds while it runs (``SharedMemoryRegistry.bind``)."""
    peer: Peer | None = None
    """The client that sent it (frontends set it when the request names shared memory)."""
    instance: str = ""
    """The instance it was last sent to (named when its deadline passes)."""
    cancel: Callable[[], None] | None = None
    """Set once the request is sent to a worker: tells the model its client went away."""
    ack: Callable[[int], None] | None = None
    """Set once a decoupled request is sent to a worker: tells it how many more responses
    were consumed (flow control of its response sender)."""
    responses: Callable[[InferResult | ServingError | None, bool], None] | None = None
    """A decoupled model's request: where each response goes as the worker sends it (``None``:
    no response, only the final flag), with whether it is the last. The sink owns each
    ``InferResult`` it gets (``done`` it)."""
    trace: Trace | None = None
    """Set when the request is traced (``server.tracing``): its stages record their times."""
    backlog: Callable[[], int] | None = None
    """Set by ``DataPlane.infer_stream``: how many of the request's responses have arrived and
    wait to be taken (a frontend may write those in one go)."""

    @property
    def uses_shm(self) -> bool:
        """Some input or requested output is in a client shared-memory region (loops, not
        ``any()`` over generators: asked twice per request on a frontend's lane path)."""
        for t in self.inputs:
            if t.shm is not None:
                return True
        for o in self.outputs or ():
            if o.shm is not None:
                return True
        return False


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Buffer
    in_shm: bool = False
    """Written into the client's shared memory; ``data`` is empty and no bytes are sent."""
    written: int = 0
    """Bytes written into the client's shared memory (``in_shm``)."""
    arena: Block | None = None
    """Where ``data`` lies when it views a worker's output arena."""


@dataclass(slots=True)
class InferResult:
    """Outputs of one request. ``release`` must be called once the frontend has encoded
    the outputs: their ``data`` may be views of a worker's shared memory."""

    model_name: str
    model_version: int
    outputs: list[OutputTensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] | None = None
    rescheduled: bool = False
    """The model released the request with RESCHEDULE (iterative sequences): this execution
    has no response; the sequence batcher runs it again."""

    def done(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()
