"""``EnsembleScheduler`` in process, on plans made by ``ensemble.plan`` and a fake
``run_step`` whose step executions the test finishes or fails. The outputs of a step are
strings naming how they were computed (``join(left(pre(X)),right(pre(X)))``), so where a
tensor came from can be read off the result."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from shoal.proto.errors import BackendError, ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server import ensemble
from shoal.server.scheduling.ensemble import EnsembleScheduler
from shoal.server.stats import ModelStats
from shoal.server.types import InferRequest, InferResult, InputTensor, OutputTensor
from shoal.shm.block import Block
from tests.component.fakes import Harness, config, error_of, request, result_of, settle

COMPOSING = {
    name: config(
        f'name: "{name}" max_batch_size: 0 '
        + " ".join(f'input {{ name: "{i}" data_type: TYPE_FP32 dims: [ 4 ] }}' for i in ins)
        + " ".join(f'output {{ name: "{o}" data_type: TYPE_FP32 dims: [ 4 ] }}' for o in outs)
    )
    for name, ins, outs in (
        ("pre", ["IN"], ["OUT"]),
        ("left", ["IN"], ["OUT"]),
        ("right", ["IN"], ["OUT"]),
        ("join", ["A", "B"], ["SUM"]),
    )
}


def lookup(name: str, version: int) -> mc.ModelConfig:
    if name not in COMPOSING:
        raise ServingError(f"model '{name}' is not available", code=ErrorCode.NOT_FOUND)
    return COMPOSING[name]


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'step {{ model_name: "{model}" model_version: -1 {ins} {outs} }}'


def tensors(kind: str, names: list[str]) -> str:
    return " ".join(f'{kind} {{ name: "{n}" data_type: TYPE_FP32 dims: [ 4 ] }}' for n in names)


DIAMOND = config(
    'name: "diamond" platform: "ensemble" max_batch_size: 0 '
    + tensors("input", ["X"])
    + tensors("output", ["Y", "L"])
    + " ensemble_scheduling { "
    # listed out of order: the plan puts "pre" first
    + step("join", {"A": "L", "B": "r"}, {"SUM": "Y"})
    + step("pre", {"IN": "X"}, {"OUT": "p"})
    + step("left", {"IN": "p"}, {"OUT": "L"})
    + step("right", {"IN": "p"}, {"OUT": "r"})
    + " }"
).SerializeToString()
"""X -> pre -> p; p -> left -> L (an output, also read by join), p -> right -> r; (L, r) -> join -> Y."""

CHAIN = config(
    'name: "chain" platform: "ensemble" max_batch_size: 0 '
    + tensors("input", ["X"])
    + tensors("output", ["Y"])
    + " ensemble_scheduling { "
    + step("pre", {"IN": "X"}, {"OUT": "a"})
    + step("left", {"IN": "a"}, {"OUT": "b"})
    + step("right", {"IN": "b"}, {"OUT": "Y"})
    + " }"
).SerializeToString()


@dataclass(eq=False)
class StepCall:
    request: InferRequest
    gate: asyncio.Future[None]
    cancelled: bool = False

    @property
    def model(self) -> str:
        return self.request.model_name

    def input(self, name: str) -> InputTensor:
        (t,) = [t for t in self.request.inputs if t.name == name]
        return t

    def finish(self) -> None:
        self.gate.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self.gate.set_exception(exc)


@dataclass
class FakeSteps:
    """``run_step``: each step waits until the test finishes it (while ``hold``), then returns
    each requested output as ``model(input, ...)``; ``arena``: models whose outputs lie in
    their arena; ``missing``: models that return no outputs."""

    calls: list[StepCall] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    arena: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    hold: bool = True

    async def __call__(self, req: InferRequest) -> InferResult:
        call = StepCall(req, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        if not self.hold:
            call.finish()
        try:
            await call.gate
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        model = req.model_name
        data = f"{model}({','.join(bytes(t.data).decode() for t in req.inputs)})".encode()
        block = Block(f"{model}-arena", 0, len(data)) if model in self.arena else None
        assert req.outputs is not None
        outs = (
            []
            if model in self.missing
            else [OutputTensor(o.name, "FP32", (4,), data, arena=block) for o in req.outputs]
        )
        return InferResult(model, 1, outs, id=req.id, release=lambda: self.released.append(model))

    def started(self) -> list[str]:
        return [c.model for c in self.calls]

    def call(self, model: str) -> StepCall:
        (c,) = [c for c in self.calls if c.model == model]
        return c

    def let_go(self) -> None:
        """Finish every step, those that start later included."""
        self.hold = False
        for c in self.calls:
            if not c.gate.done():
                c.finish()

    async def finish(self, *models: str) -> None:
        for model in models:
            self.call(model).finish()
            await settle()


@dataclass
class Setup:
    scheduler: EnsembleScheduler
    steps: FakeSteps
    stats: ModelStats

    def submit(self, h: Harness, outputs: list[str] | None = None) -> asyncio.Task[InferResult]:
        req = request("req-1", [InputTensor("X", "FP32", (4,), b"X")], params={"p": 1}, outputs=outputs)
        req.model_name = self.scheduler.plan.name
        return h.spawn(self.scheduler.submit(req))


def make(h: Harness, serialized: bytes = DIAMOND) -> Setup:
    cfg = mc.ModelConfig.FromString(serialized)
    steps = FakeSteps()
    h.cleanups.append(steps.let_go)
    stats = ModelStats(cfg.name, 1)
    return Setup(h.own(EnsembleScheduler(ensemble.plan(cfg, lookup), steps, stats)), steps, stats)


def data(result: InferResult) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in result.outputs}


# ---- the step graph --------------------------------------------------------------------------


async def test_steps_follow_the_graph_and_the_outputs_are_returned(h: Harness) -> None:
    s = make(h)
    task = s.submit(h)
    await settle()
    assert s.steps.started() == ["pre"]
    pre = s.steps.call("pre").request
    assert (pre.model_name, pre.model_version, pre.id, pre.parameters) == ("pre", -1, "req-1", {"p": 1})
    assert pre.outputs is not None and [o.name for o in pre.outputs] == ["OUT"]
    await s.steps.finish("pre")
    assert s.steps.started() == ["pre", "left", "right"]
    await s.steps.finish("right")
    assert s.steps.started() == ["pre", "left", "right"], "join started before both its inputs existed"
    await s.steps.finish("left")
    assert s.steps.started() == ["pre", "left", "right", "join"]
    join = s.steps.call("join")
    assert bytes(join.input("A").data) == b"left(pre(X))" and bytes(join.input("B").data) == b"right(pre(X))"
    assert not task.done()
    await s.steps.finish("join")
    result = result_of(task)
    assert (result.model_name, result.id) == ("diamond", "req-1")
    assert data(result) == {"Y": b"join(left(pre(X)),right(pre(X)))", "L": b"left(pre(X))"}
    assert s.stats.execution_count == 1 and s.stats.durations["success"].count == 1


async def test_independent_steps_run_at_the_same_time(h: Harness) -> None:
    s = make(h)
    s.submit(h)
    await settle()
    await s.steps.finish("pre")
    # neither has finished, both are running
    assert [c.model for c in s.steps.calls if not c.gate.done()] == ["left", "right"]


async def test_a_chain_runs_one_step_after_the_other(h: Harness) -> None:
    s = make(h, CHAIN)
    task = s.submit(h)
    for expected in (["pre"], ["pre", "left"], ["pre", "left", "right"]):
        await settle()
        assert s.steps.started() == expected
        s.steps.calls[-1].finish()
    await settle()
    assert data(result_of(task)) == {"Y": b"right(left(pre(X)))"}


async def test_only_the_requested_outputs_are_returned(h: Harness) -> None:
    s = make(h)
    task = s.submit(h, outputs=["L"])
    await settle()
    await s.steps.finish("pre", "left", "right", "join")
    result = result_of(task)
    assert data(result) == {"L": b"left(pre(X))"}
    assert sorted(s.steps.released) == ["join", "pre", "right"]  # all but the one the response reads
    result.done()
    assert sorted(s.steps.released) == ["join", "left", "pre", "right"]


# ---- leases ------------------------------------------------------------------------------------


async def test_a_result_is_given_back_when_its_last_reader_finishes(h: Harness) -> None:
    s = make(h)
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre", "left")
    assert s.steps.released == []  # "right" still reads pre's output
    await s.steps.finish("right")
    assert s.steps.released == ["pre"]  # while "join" runs
    await s.steps.finish("join")
    result = result_of(task)
    assert s.steps.released == ["pre", "right"]  # "left" and "join" make the response's outputs
    result.done()
    assert sorted(s.steps.released) == ["join", "left", "pre", "right"]
    result.done()
    assert len(s.steps.released) == 4


async def test_arena_outputs_are_read_in_place_under_the_producers_lease(h: Harness) -> None:
    s = make(h, CHAIN)
    s.steps.arena.add("pre")
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre")
    arg = s.steps.call("left").input("IN")
    assert arg.arena is not None and arg.arena.block == Block("pre-arena", 0, len(b"pre(X)"))
    lease = arg.arena.lease
    lease.hold()  # the pool holds it while the next worker reads the block
    await s.steps.finish("left")
    assert s.steps.released == []
    lease.drop()
    assert s.steps.released == ["pre"]
    await s.steps.finish("right")
    result_of(task).done()
    assert s.steps.released == ["pre", "left", "right"]


# ---- failures ----------------------------------------------------------------------------------


async def test_a_failing_step_cancels_the_others_and_names_itself(h: Harness) -> None:
    s = make(h)
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre")
    s.steps.call("right").fail(BackendError("boom", code=ErrorCode.INVALID_ARGUMENT))
    await settle()
    err = error_of(task)
    assert isinstance(err, BackendError) and err.code is ErrorCode.INVALID_ARGUMENT
    assert err.message == "in ensemble 'diamond', step 3 (model 'right'): boom"
    assert s.steps.call("left").cancelled
    assert "join" not in s.steps.started()
    assert s.steps.released == ["pre"]
    assert s.stats.durations["fail"].count == 1 and s.stats.execution_count == 0
    assert s.scheduler.inflight == 0


async def test_an_unexpected_step_exception_is_internal(h: Harness) -> None:
    s = make(h, CHAIN)
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre")
    s.steps.call("left").fail(RuntimeError("bug"))
    await settle()
    err = error_of(task)
    assert err.code is ErrorCode.INTERNAL
    assert err.message == "in ensemble 'chain', step 1 (model 'left'): RuntimeError('bug')"
    assert s.steps.released == ["pre"] and s.steps.started() == ["pre", "left"]


async def test_a_step_without_its_output_fails_the_request(h: Harness) -> None:
    s = make(h, CHAIN)
    s.steps.missing.add("left")
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre", "left")
    err = error_of(task)
    assert err.code is ErrorCode.INTERNAL
    assert err.message == "in ensemble 'chain', step 1 (model 'left'): the model returned no output 'OUT'"
    assert s.steps.released == ["pre", "left"] and s.steps.started() == ["pre", "left"]


async def test_a_request_that_goes_away_cancels_its_steps_and_drops_its_leases(h: Harness) -> None:
    s = make(h)
    task = s.submit(h)
    await settle()
    await s.steps.finish("pre")
    task.cancel()
    await settle()
    assert task.cancelled()
    assert s.steps.call("left").cancelled and s.steps.call("right").cancelled
    assert s.steps.released == ["pre"] and s.scheduler.inflight == 0


# ---- admission ---------------------------------------------------------------------------------


async def test_drain_waits_for_requests_in_flight_and_refuses_new_ones(h: Harness) -> None:
    s = make(h, CHAIN)
    task = s.submit(h)
    await settle()
    drain = h.spawn(s.scheduler.drain(60.0))
    await settle()
    with pytest.raises(ServingError) as ei:
        await s.scheduler.submit(request("late"))
    assert ei.value.code is ErrorCode.UNAVAILABLE
    assert not drain.done() and s.scheduler.inflight == 1
    await s.steps.finish("pre", "left", "right")
    assert drain.done() and data(result_of(task)) == {"Y": b"right(left(pre(X)))"}
