"""In-process stand-ins for what the schedulers drive: a pool of fake instances whose
executions the test finishes (or fails) when it chooses, a nanosecond clock the test
advances, a harness that cleans up after each test, and request builders."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
from google.protobuf import text_format

from shoal.proto import dtypes
from shoal.proto.errors import ModelNotReady, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.dispatch.pool import InstancePool
from shoal.server.scheduling.base import Scheduler
from shoal.server.types import InferRequest, InferResult, InputTensor, OutputTensor, RequestedOutput

T = TypeVar("T")
MS = 1_000_000
"""Nanoseconds in a millisecond."""


def config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


async def settle(rounds: int = 50) -> None:
    """Let every callback that is ready run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """``time.monotonic_ns`` that moves only when the test says so."""

    def __init__(self, start: int = 1_000 * MS) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


# ---- the pool -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeSpec:
    instance_name: str


class FakeWorker:
    """The part of ``Worker`` the schedulers read."""

    def __init__(self, name: str) -> None:
        self.spec = FakeSpec(name)
        self.ready = True
        self.outstanding = 0
        self.generation = 1
        """Bumped when the instance restarts (its sequences' state is gone)."""

    @property
    def label(self) -> str:
        return f"fake instance '{self.spec.instance_name}'"


Respond = Callable[[InferRequest], "InferResult | ServingError"]


def echo(request: InferRequest) -> InferResult:
    """Every input comes back as an output of the same name (the bytes copied)."""
    outputs = [OutputTensor(t.name, t.datatype, t.shape, bytes(t.data)) for t in request.inputs]
    return InferResult(request.model_name, request.model_version, outputs, id=request.id)


@dataclass(eq=False)
class Call:
    """One ``pool.run``: its batch, the instance it ran on, and the gate the test opens."""

    batch: list[InferRequest]
    worker: FakeWorker
    gate: asyncio.Future[None]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.batch]

    @property
    def open(self) -> bool:
        return not self.gate.done()

    def finish(self) -> None:
        """Let the execution end: each request gets the pool's ``respond`` result."""
        self.gate.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The whole execution fails: ``pool.run`` raises ``exc``."""
        self.gate.set_exception(exc)


class FakePool:
    """Stands in for ``InstancePool``: ``run`` records a ``Call`` and, when ``hold`` is set,
    waits until the test finishes it; otherwise it answers at the next loop turn.
    ``fail_next`` holds exceptions that the next calls raise (one each, not held)."""

    def __init__(self, instances: int = 1, *, hold: bool = False, respond: Respond = echo) -> None:
        self.workers = [FakeWorker(f"instance{i}") for i in range(instances)]
        self.hold = hold
        self.respond = respond
        self.calls: list[Call] = []
        self.fail_next: deque[BaseException] = deque()
        self.made = 0
        """Results handed out."""
        self.released = 0
        """Results whose ``done()`` was called."""

    def as_pool(self) -> InstancePool:
        return cast(InstancePool, self)

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    def pick(self) -> FakeWorker:
        ready = [w for w in self.workers if w.ready]
        if not ready:
            raise ModelNotReady("no instance of the model is ready")
        return min(ready, key=lambda w: w.outstanding)

    @property
    def open_calls(self) -> list[Call]:
        return [c for c in self.calls if c.open]

    async def run(
        self, batch: Sequence[InferRequest], worker: FakeWorker | None = None
    ) -> list[InferResult | ServingError]:
        if worker is None:
            worker = self.pick()
        elif not worker.ready:
            raise ModelNotReady(f"{worker.label} is not ready")
        call = Call(list(batch), worker, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        worker.outstanding += 1
        try:
            if self.fail_next:
                call.gate.set_result(None)
                raise self.fail_next.popleft()
            if self.hold:
                await call.gate
            else:
                call.gate.set_result(None)
                await asyncio.sleep(0)
        finally:
            worker.outstanding -= 1
        out: list[InferResult | ServingError] = []
        for request in batch:
            res = self.respond(request)
            if isinstance(res, InferResult):
                self.made += 1
                res.release = self._on_release
            out.append(res)
        return out

    def _on_release(self) -> None:
        self.released += 1


# ---- the harness --------------------------------------------------------------------------


class Harness:
    """Tasks and schedulers of one test: at its end, schedulers are drained, executions
    still held are let go and leftover tasks are cancelled (a broken scheduler fails its
    test instead of hanging it or leaking tasks into the next one)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.schedulers: list[Scheduler] = []
        self.pools: list[FakePool] = []
        self.cleanups: list[Callable[[], None]] = []
        """Run before the leftover tasks are cancelled (e.g. to finish held executions)."""

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    def own(self, scheduler: T) -> T:
        self.schedulers.append(cast(Scheduler, scheduler))
        return scheduler

    def pool(self, instances: int = 1, *, hold: bool = False, respond: Respond = echo) -> FakePool:
        pool = FakePool(instances, hold=hold, respond=respond)
        self.pools.append(pool)
        return pool

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.drain(0.0)
        for pool in self.pools:
            pool.hold = False
            for call in pool.open_calls:
                call.finish()
        for cleanup in self.cleanups:
            cleanup()
        await settle()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await settle()


def result_of(task: asyncio.Task[InferResult]) -> InferResult:
    assert task.done(), "the request is still waiting"
    return task.result()


def error_of(task: asyncio.Task[Any]) -> ServingError:
    assert task.done(), "the request is still waiting"
    assert not task.cancelled(), "the request was cancelled"
    exc = task.exception()
    assert isinstance(exc, ServingError), f"expected a ServingError, got {exc!r}"
    return exc


# ---- requests and tensors -----------------------------------------------------------------

_NUMPY = {
    "INT32": np.int32,
    "UINT32": np.uint32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "BOOL": np.bool_,
}


def tensor(name: str, values: Sequence[Any], shape: tuple[int, ...], datatype: str = "INT32") -> InputTensor:
    return InputTensor(name, datatype, shape, np.array(values, dtype=_NUMPY[datatype]).tobytes())


def zeros(name: str, shape: tuple[int, ...], datatype: str = "FP32") -> InputTensor:
    return InputTensor(name, datatype, shape, bytes(dtypes.element_count(shape) * 4))


def values(t: InputTensor | OutputTensor) -> list[Any]:
    """The elements of a tensor as Python values (BYTES: ``bytes``)."""
    if t.datatype == "BYTES":
        return list(dtypes.deserialize_bytes(t.data, dtypes.element_count(t.shape)))
    return cast(list[Any], np.frombuffer(bytes(t.data), dtype=_NUMPY[t.datatype]).tolist())


def request(
    rid: str,
    inputs: list[InputTensor] | None = None,
    *,
    shape: tuple[int, ...] = (1, 3),
    params: dict[str, Any] | None = None,
    model: str = "m",
    outputs: list[str] | None = None,
) -> InferRequest:
    """A request named ``rid`` (its id), by default one FP32 ``INPUT0`` of ``shape``."""
    ins = inputs if inputs is not None else [zeros("INPUT0", shape)]
    return InferRequest(
        model_name=model,
        model_version=1,
        inputs=ins,
        outputs=None if outputs is None else [RequestedOutput(o) for o in outputs],
        id=rid,
        parameters=dict(params or {}),
        batch_size=ins[0].shape[0] if ins and ins[0].shape else 1,
    )


@dataclass
class Order:
    """The order in which tasks finished (a done callback on each)."""

    names: list[str] = field(default_factory=list)

    def watch(self, name: str, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        task.add_done_callback(lambda _: self.names.append(name))
        return task
