"""``EnsembleScheduler``: runs an ensemble's step graph for each request, in the router.

A step starts as soon as the tensors it reads exist, so independent steps run at the same
time; each step is an ordinary request to its composing model (``run_step``: lookup,
validation, that model's own scheduler), so composing models batch as usual.

Tensors move between steps by reference: an output a worker left in its output arena is
read in place by the next step's worker (``ArenaRef``), inputs in client shared memory
stay there, outputs the client wants in its shared memory are written there by the step
that makes them. The router copies no tensor bytes. Each step's result is held by a
``Lease`` and given back to its worker as soon as the last step reading it has finished
(or, for the ensemble's outputs, once the response is sent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shoal.proto.errors import BackendError, ErrorCode, ServingError, WorkerDied, detach
from shoal.server.ensemble import EnsemblePlan, StepPlan
from shoal.server.scheduling.base import SchedulerBase
from shoal.server.stats import ModelStats
from shoal.server.types import (
    ArenaRef,
    InferRequest,
    InferResult,
    InputTensor,
    Lease,
    OutputTensor,
    RequestedOutput,
    ShmRef,
)

RunStep = Callable[[InferRequest], Awaitable[InferResult]]
"""Runs one request on the composing model it names (lookup, validation, its scheduler)."""


@dataclass(slots=True)
class _Made:
    """An ensemble tensor a step produced."""

    tensor: OutputTensor
    step: int
    shm: ShmRef | None = None
    """The client region it was written into (an ensemble output the client placed there)."""


@dataclass(slots=True)
class _Run:
    """The state of one ensemble request."""

    request: InferRequest
    made: dict[str, _Made] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    readers: dict[int, set[int]] = field(default_factory=dict)
    """Producing step -> the steps reading its outputs that have not finished yet."""
    keep: set[int] = field(default_factory=set)
    """Steps whose outputs are returned: held until the response is sent."""
    dropped: set[int] = field(default_factory=set)

    def drop(self, step: int) -> None:
        if step in self.dropped or step not in self.leases:
            return
        self.dropped.add(step)
        self.leases[step].drop()


class EnsembleScheduler(SchedulerBase):
    def __init__(self, plan: EnsemblePlan, run_step: RunStep, stats: ModelStats) -> None:
        self.plan = plan
        self.run_step = run_step
        self.stats = stats
        super().__init__()

    async def submit(self, request: InferRequest) -> InferResult:
        self._admission.check()
        self._admission.enter()
        t0 = time.monotonic_ns()
        ok = False
        try:
            result = await self._run(request)
            ok = True
            self.stats.execution(request.batch_size, 1, 0, 0, 0)
            return result
        finally:
            self._admission.leave()
            self.stats.request_done(ok, time.monotonic_ns() - t0, 0)

    # ---- one request --------------------------------------------------------------------

    async def _run(self, request: InferRequest) -> InferResult:
        plan = self.plan
        run = _Run(request)
        wanted = [o.name for o in request.outputs] if request.outputs is not None else list(plan.outputs)
        out_shm = {o.name: o.shm for o in request.outputs or () if o.shm is not None}
        given = {t.name: t for t in request.inputs}
        run.keep = {plan.producer[name] for name in wanted}
        waiting = list(plan.steps)
        running: dict[asyncio.Task[InferResult], StepPlan] = {}
        try:
            while waiting or running:
                for step in [s for s in waiting if s.after <= run.leases.keys()]:  # its producers are done
                    waiting.remove(step)
                    task = asyncio.ensure_future(self.run_step(self._step_request(step, run, given, out_shm)))
                    running[task] = step
                if not running:
                    stuck = waiting[0]
                    raise ServingError(
                        f"in ensemble '{plan.name}', {stuck.label} cannot run: an input it reads was not produced",
                        code=ErrorCode.INTERNAL,
                    )
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = running.pop(task)
                    self._finished(step, run)
                    exc = task.exception()
                    if exc is not None:
                        err = _in_step(plan.name, step, exc)
                        detach(exc)  # its traceback holds the step's frames (and their request)
                        del exc
                        try:
                            raise err
                        finally:
                            del err  # no cycle through this frame's local
                    self._collect(step, task.result(), run, out_shm)
            return self._result(request, run, wanted)
        except BaseException:
            for task in running:
                task.cancel()
            if running:
                results = await asyncio.gather(*running, return_exceptions=True)
                for res in results:
                    if isinstance(res, InferResult):
                        res.done()
            for index in list(run.leases):
                run.drop(index)
            raise

    def _step_request(
        self, step: StepPlan, run: _Run, given: dict[str, InputTensor], out_shm: dict[str, ShmRef]
    ) -> InferRequest:
        parent = run.request
        inputs: list[InputTensor] = []
        for model_input, tensor in step.inputs:
            source = given.get(tensor)
            if source is not None:
                t = source  # passed on as it came: inline, in client shm, or in a worker's arena
                inputs.append(InputTensor(model_input, t.datatype, t.shape, t.data, shm=t.shm, arena=t.arena))
                continue
            made = run.made.get(tensor)
            if made is None:
                continue  # an optional ensemble input the client left out
            inputs.append(_input_from(model_input, made, run.leases[made.step]))
        # outputs only GPU steps read may stay on the GPU (not while traced: a trace may record them)
        on_gpu = step.on_gpu if parent.trace is None else frozenset()
        outputs = [
            RequestedOutput(model_output, shm=out_shm.get(tensor), on_gpu=model_output in on_gpu)
            for model_output, tensor in step.outputs
        ]
        return InferRequest(
            model_name=step.model,
            model_version=step.version,
            inputs=inputs,
            outputs=outputs,
            id=parent.id,
            parameters=dict(parent.parameters),
            trace=parent.trace.child() if parent.trace is not None else None,
        )

    def _collect(self, step: StepPlan, result: InferResult, run: _Run, out_shm: dict[str, ShmRef]) -> None:
        run.leases[step.index] = Lease(result.done)
        names = dict(step.outputs)
        for t in result.outputs:
            tensor = names.get(t.name)
            if tensor is not None:
                run.made[tensor] = _Made(t, step.index, out_shm.get(tensor) if t.in_shm else None)
        missing = [name for name, tensor in step.outputs if tensor not in run.made]
        if missing:
            raise ServingError(
                f"in ensemble '{self.plan.name}', {step.label}: the model returned no output '{missing[0]}'",
                code=ErrorCode.INTERNAL,
            )
        run.readers[step.index] = set(step.readers)
        if not step.readers and step.index not in run.keep:
            run.drop(step.index)  # nothing reads it and it is not returned

    def _finished(self, step: StepPlan, run: _Run) -> None:
        """``step`` no longer needs its inputs: give back results nobody else will read."""
        for producer in step.after:
            readers = run.readers.get(producer)
            if readers is None:
                continue
            readers.discard(step.index)
            if not readers and producer not in run.keep:
                run.drop(producer)

    def _result(self, request: InferRequest, run: _Run, wanted: list[str]) -> InferResult:
        outputs = []
        for name in wanted:
            made = run.made[name]
            t = made.tensor
            outputs.append(OutputTensor(name, t.datatype, t.shape, t.data, t.in_shm, t.written, t.arena))
        keep = sorted(run.keep)
        for index in list(run.leases):
            if index not in run.keep:
                run.drop(index)

        def release() -> None:
            for index in keep:
                run.drop(index)

        return InferResult(
            model_name=request.model_name,
            model_version=request.model_version,
            outputs=outputs,
            id=request.id,
            release=release,
        )


def _input_from(name: str, made: _Made, lease: Lease) -> InputTensor:
    """The next step's input made from an earlier step's output, without copying it."""
    t = made.tensor
    if t.in_shm:
        assert made.shm is not None
        ref = ShmRef(made.shm.region_name, made.shm.offset, t.written, made.shm.region)
        return InputTensor(name, t.datatype, t.shape, b"", shm=ref)
    if t.arena is not None:
        return InputTensor(name, t.datatype, t.shape, t.data, arena=ArenaRef(t.arena, lease))
    return InputTensor(name, t.datatype, t.shape, t.data)


def _in_step(ensemble: str, step: StepPlan, exc: BaseException) -> ServingError:
    if isinstance(exc, ServingError):
        kind = BackendError if isinstance(exc, BackendError | WorkerDied) else ServingError
        return kind(f"in ensemble '{ensemble}', {step.label}: {exc.message}", code=exc.code)
    return ServingError(f"in ensemble '{ensemble}', {step.label}: {exc!r}", code=ErrorCode.INTERNAL)
