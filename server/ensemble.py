"""Ensemble configurations: the step graph of a ``platform: "ensemble"`` model, checked
against its composing models' configurations. Pure: no processes, no I/O.

Every error names the ensemble and, where there is one, the step (index and model):
unknown or unavailable composing models, tensors a step does not have, required inputs
left unmapped, tensors produced twice or never, ensemble inputs no step reads and step
outputs nobody uses, datatype and shape disagreements, batch sizes a composing model
cannot take, and cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from shoal.proto import dtypes
from shoal.proto.errors import InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc

ENSEMBLE = "ensemble"


@dataclass(frozen=True, slots=True)
class StepPlan:
    index: int
    model: str
    version: int
    """``-1``: the composing model's newest ready version at each request."""
    inputs: tuple[tuple[str, str], ...]
    """(composing model input, ensemble tensor)."""
    outputs: tuple[tuple[str, str], ...]
    """(composing model output, ensemble tensor)."""
    after: frozenset[int] = frozenset()
    """Steps whose outputs this step reads."""
    readers: frozenset[int] = frozenset()
    """Steps that read this step's outputs."""
    on_gpu: frozenset[str] = frozenset()
    """Composing model outputs that may stay in GPU memory (``gpu_resident``)."""

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model}')"


@dataclass(frozen=True, slots=True)
class EnsemblePlan:
    name: str
    steps: tuple[StepPlan, ...]
    """In a topological order: every step comes after the steps it reads from."""
    inputs: frozenset[str]
    outputs: tuple[str, ...]
    producer: dict[str, int]
    """Ensemble tensor -> index of the step that writes it."""
    consumers: dict[str, tuple[int, ...]]
    """Ensemble tensor -> indexes of the steps that read it."""


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE


def composing_models(config: mc.ModelConfig) -> list[str]:
    """The distinct model names the steps use, in step order."""
    seen: dict[str, None] = {}
    for step in config.ensemble_scheduling.step:
        seen.setdefault(step.model_name, None)
    return list(seen)


Lookup = Callable[[str, int], mc.ModelConfig]
"""(model name, version or -1) -> that version's configuration; raises ``ServingError``."""


def plan(config: mc.ModelConfig, lookup: Lookup) -> EnsemblePlan:
    """Check ``config``'s steps against the composing models and order them; raises
    ``InvalidInput`` naming the step."""
    name = config.name
    where = f"ensemble '{name}'"
    if not config.HasField("ensemble_scheduling") or not config.ensemble_scheduling.step:
        raise InvalidInput(f"{where}: ensemble_scheduling has no step")
    ens_batch = config.max_batch_size
    # tensor -> (datatype, dims in the ensemble's frame, who declared it)
    seen: dict[str, tuple[str, tuple[int, ...], str]] = {}

    def declare(tensor: str, datatype: str, dims: tuple[int, ...], who: str) -> None:
        prior = seen.get(tensor)
        if prior is None:
            seen[tensor] = (datatype, dims, who)
            return
        if prior[0] != datatype:
            raise InvalidInput(f"{where}: tensor '{tensor}' is {prior[0]} for {prior[2]} but {datatype} for {who}")
        if not _compatible(prior[1], dims):
            raise InvalidInput(
                f"{where}: tensor '{tensor}' has shape {list(prior[1])} for {prior[2]} but {list(dims)} for {who}"
            )

    inputs = {t.name: t for t in config.input}
    outputs = [t.name for t in config.output]
    for ti in config.input:
        declare(ti.name, _dtype(ti.data_type), tuple(ti.dims), "the ensemble input")
    for to in config.output:
        declare(to.name, _dtype(to.data_type), tuple(to.dims), "the ensemble output")

    steps: list[StepPlan] = []
    gpu_only: list[bool] = []
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, step in enumerate(config.ensemble_scheduling.step):
        label = f"step {i} (model '{step.model_name}')"
        if not step.model_name:
            raise InvalidInput(f"{where}: step {i} names no model")
        if step.model_name == name:
            raise InvalidInput(f"{where}: {label} is the ensemble itself")
        try:
            sub = lookup(step.model_name, int(step.model_version))
        except ServingError as exc:
            raise InvalidInput(f"{where}: {label}: {exc.message}") from None
        if ens_batch > 0 and sub.max_batch_size < ens_batch:
            raise InvalidInput(
                f"{where} allows batch size {ens_batch}, but {label} allows at most {sub.max_batch_size}"
            )
        # the router reads the tensors of a model with a response cache (its key) or sequence
        # batching (its state): those keep theirs in host memory
        gpu_only.append(reads_on_gpu(sub))
        lead: tuple[int, ...] = (-1,) if ens_batch == 0 and sub.max_batch_size > 0 else ()
        sub_in = {t.name: t for t in sub.input}
        sub_out = {t.name: t for t in sub.output}
        for model_input, tensor in step.input_map.items():
            t_in = sub_in.get(model_input)
            if t_in is None:
                raise InvalidInput(f"{where}: {label} maps '{model_input}', which is not an input of the model")
            declare(tensor, _dtype(t_in.data_type), lead + tuple(t_in.dims), f"{label} input '{model_input}'")
            consumers.setdefault(tensor, []).append(i)
        for t_in in sub.input:
            if t_in.name not in step.input_map and not t_in.optional:
                raise InvalidInput(f"{where}: {label} leaves the model's input '{t_in.name}' unmapped")
        if not step.output_map:
            raise InvalidInput(f"{where}: {label} maps no output")
        for model_output, tensor in step.output_map.items():
            t_out = sub_out.get(model_output)
            if t_out is None:
                raise InvalidInput(f"{where}: {label} maps '{model_output}', which is not an output of the model")
            if tensor in inputs:
                raise InvalidInput(f"{where}: {label} writes '{tensor}', which is an ensemble input")
            if tensor in producer:
                raise InvalidInput(f"{where}: tensor '{tensor}' is written by step {producer[tensor]} and {label}")
            producer[tensor] = i
            declare(tensor, _dtype(t_out.data_type), lead + tuple(t_out.dims), f"{label} output '{model_output}'")
        steps.append(
            StepPlan(
                index=i,
                model=step.model_name,
                version=int(step.model_version),
                inputs=tuple(sorted(step.input_map.items())),
                outputs=tuple(sorted(step.output_map.items())),
            )
        )

    for tensor, readers in consumers.items():
        if tensor not in inputs and tensor not in producer:
            raise InvalidInput(
                f"{where}: step {readers[0]} (model '{steps[readers[0]].model}') reads '{tensor}', "
                "which is neither an ensemble input nor any step's output"
            )
    for out in outputs:
        if out not in producer:
            raise InvalidInput(f"{where}: no step writes the ensemble output '{out}'")
    for tensor in inputs:
        if tensor not in consumers:
            raise InvalidInput(f"{where}: no step reads the ensemble input '{tensor}'")
    for tensor, i in producer.items():
        if tensor not in consumers and tensor not in outputs:
            raise InvalidInput(
                f"{where}: {steps[i].label} writes '{tensor}', which no step reads and is not an ensemble output"
            )
    order = _topological(steps, producer, where)
    linked = [
        replace(
            s,
            after=frozenset(producer[t] for _, t in s.inputs if t in producer),
            readers=frozenset(c for _, t in s.outputs for c in consumers.get(t, ())),
            on_gpu=gpu_resident(s, gpu_only, consumers, outputs),
        )
        for s in steps
    ]
    return EnsemblePlan(
        name=name,
        steps=tuple(linked[i] for i in order),
        inputs=frozenset(inputs),
        outputs=tuple(outputs),
        producer=producer,
        consumers={t: tuple(r) for t, r in consumers.items()},
    )


def gpu_resident(
    step: StepPlan, gpu_only: list[bool], consumers: dict[str, list[int]], outputs: list[str]
) -> frozenset[str]:
    """The outputs of ``step`` that may stay in its instance's CUDA arena: the step runs on
    GPUs only, the tensor is not an ensemble output (the router sends those), and every step
    reading it runs on GPUs only (it opens the arena's IPC handle, and reads in place or
    copies once). Neither side may have a response cache or sequence batching, whose tensors
    the router reads. Whether an output does stay there is the producing worker's matter: a
    backend that returns it in GPU memory (PyTorch, ONNX Runtime on CUDA, a Python model's
    GPU tensor) has it copied into the arena; host outputs go through host memory as ever."""
    if not gpu_only[step.index]:
        return frozenset()
    return frozenset(
        model_output
        for model_output, tensor in step.outputs
        if tensor not in outputs and all(gpu_only[c] for c in consumers.get(tensor, ()))
    )


def reads_on_gpu(config: mc.ModelConfig) -> bool:
    """A model whose instances all run on GPUs and whose tensors the router never reads (no
    response cache, no sequence batching): its outputs may stay on the GPU, and it can read
    inputs there."""
    return _gpu_only(config) and not config.response_cache.enable and not config.HasField("sequence_batching")


def _gpu_only(config: mc.ModelConfig) -> bool:
    groups = config.instance_group
    return bool(groups) and all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in groups)


def _topological(steps: list[StepPlan], producer: dict[str, int], where: str) -> list[int]:
    deps = {s.index: {producer[t] for _, t in s.inputs if t in producer} for s in steps}
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(steps):
        ready = [i for i in sorted(deps) if i not in done and deps[i] <= done]
        if not ready:
            stuck = [steps[i].label for i in sorted(deps) if i not in done]
            raise InvalidInput(f"{where}: the steps form a cycle: {', '.join(stuck)}")
        order.extend(ready)
        done.update(ready)
    return order


def _dtype(number: int) -> str:
    dt = dtypes.BY_CONFIG_NUMBER.get(number)
    return dt.protocol if dt is not None else "INVALID"


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))
