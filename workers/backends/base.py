"""The backend interface: one object is one model instance on one device in one process.

A backend is synchronous and blocking; the worker runtime owns all concurrency and calls
``execute`` from one thread. Heavy runtimes (onnxruntime, torch, tensorrt) are imported
inside the backend's module only, so a missing runtime fails that model's load alone.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.backends.ragged import Ragged
from shoal.workers.devview import as_cupy
from shoal.workers.tensors import is_device_array

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Device:
    """Where an instance runs: ``kind`` is ``"CPU"`` or ``"GPU"``; ``index`` is the CUDA
    ordinal as the worker sees it (``-1`` on CPU)."""

    kind: str = "CPU"
    index: int = -1

    @property
    def is_gpu(self) -> bool:
        return self.kind == "GPU"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything a backend needs to load one instance. Owned by the worker runtime."""

    name: str
    version: int
    config: mc.ModelConfig
    """The normalized configuration (never mutated by a backend)."""
    repository: str
    """The model repository root directory."""
    model_dir: str
    """``<repository>/<name>``"""
    version_dir: str
    """``<repository>/<name>/<version>``"""
    instance_name: str
    device: Device = field(default_factory=Device)
    bls: Any = None
    """The worker's BLS client (``workers.bls.BlsClient``): models may call other models."""
    metrics: Any = None
    """The worker's custom-metrics client (``workers.custommetrics.MetricsClient``)."""
    backend_config: dict[str, str] = field(default_factory=dict)
    """``--backend-config`` settings for this backend (the model's ``parameters`` win)."""


def spec_from_load(load: wpb.Load, config: mc.ModelConfig, instance_name: str, device: Device) -> ModelSpec:
    """The ``ModelSpec`` a ``Load`` message describes."""
    model_dir = os.path.join(load.repository, load.model_name)
    return ModelSpec(
        name=load.model_name,
        version=load.model_version,
        config=config,
        repository=load.repository,
        model_dir=model_dir,
        version_dir=os.path.join(model_dir, str(load.model_version)),
        instance_name=instance_name,
        device=device,
        backend_config=dict(load.backend_config),
    )


def cuda_stream_priority(spec: ModelSpec) -> int:
    """CUDA stream priority for ``optimization.priority``: lower numbers run first, and CUDA
    clamps a value outside the device's range to it, so -100 is the device's highest. The
    lowest priority is CUDA's default (0), so PRIORITY_MIN changes nothing."""
    if spec.config.optimization.priority == mc.ModelOptimizationPolicy.PRIORITY_MAX:
        return -100
    return 0


def relative(path: str, repository: str) -> str:
    """``path`` as shown in messages: relative to the repository (never a host path)."""
    try:
        return os.path.relpath(path, repository)
    except ValueError:
        return os.path.basename(path)


def model_file(spec: ModelSpec, default_name: str) -> tuple[str, str]:
    """The model file of ``spec`` (``default_model_filename`` or ``default_name`` in the
    version directory) and its name for messages; ``NOT_FOUND`` when it is missing."""
    path = os.path.join(spec.version_dir, spec.config.default_model_filename or default_name)
    shown = relative(path, spec.repository)
    if not os.path.isfile(path):
        raise ServingError(f"model '{spec.name}': model file '{shown}' not found", code=ErrorCode.NOT_FOUND)
    return path, shown


@dataclass(slots=True)
class WorkRequest:
    """One inference request as a backend sees it.

    ``inputs`` hold numpy arrays that may be views of shared memory owned by someone else:
    valid during ``execute`` and until the worker has written the outputs of the batch (so
    an output may be an input itself, as in an identity model: no copy); a backend that
    keeps data beyond ``execute`` must copy it. BYTES tensors are ``object`` arrays of
    ``bytes``.
    """

    id: int
    inputs: dict[str, Array]
    requested_outputs: list[str]
    """Names the client asked for; empty means every output."""
    parameters: dict[str, Any] | str = field(default_factory=dict)
    """The request's parameters; a ``str`` is their JSON text as it arrived (not parsed unless
    a backend needs them)."""
    request_id: str = ""
    correlation_id: int | str = 0
    flags: int = 0
    cancelled: Callable[[], bool] | None = None
    """Whether the client went away (``request.is_cancelled()``)."""
    send: Callable[[WorkResponse | None, bool], None] | None = None
    """Decoupled models: sends one response (``None``: none) and whether it is the last; may be
    called from any thread, during or after ``execute``."""
    trace_id: int = 0
    """Nonzero when the router traces the request (``request.trace()`` of the Python backend:
    BLS calls made with it belong to the trace)."""
    device_outputs: frozenset[str] = frozenset()
    """Outputs the client asked for in CUDA shared memory (filled for backends that take
    device inputs): a GPU backend may leave them on the device."""
    rescheduled: bool = False
    """Set by the backend: the model released the request with RESCHEDULE (iterative
    sequences); it runs again in a later batch and has no response from this execution."""


@dataclass(slots=True)
class WorkResponse:
    """The outputs of one request, or the error that failed it."""

    outputs: dict[str, Array] = field(default_factory=dict)
    error: ServingError | None = None
    parameters: dict[str, Any] | str = field(default_factory=dict)
    """A ``str`` is JSON text of an object, sent on as it is."""


def _done() -> bool:
    return True


def _begun() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Launched:
    """A batch started by ``Backend.launch``."""

    finish: Callable[[], list[WorkResponse]]
    """Waits for the batch and gives its responses (main thread)."""
    done: Callable[[], bool] = _done
    """Whether the batch's device work is done (does not wait); false until it has begun."""
    start: Callable[[], None] = _begun
    """Begins the batch if ``launch`` left it waiting (``pipeline.BatchThread``): the worker
    calls it before it reads the next batch; else ``finish`` runs it."""


class Backend(ABC):
    """One model instance. ``load`` is a factory, so no half-built backend exists."""

    kind: ClassVar[str]
    device_inputs: bool = False
    """True when the backend takes inputs that live in CUDA memory as CuPy arrays (no host
    copy); otherwise the worker copies them to the host first."""
    device_views: bool = False
    """With ``device_inputs``: such inputs come as ``workers.devview.DeviceView`` (address,
    shape and type) instead of CuPy arrays."""
    reads_cancel: bool = False
    """Whether the backend reads ``WorkRequest.cancelled`` (else the worker leaves it None)."""
    host_input: Callable[[int], memoryview] | None = None
    """Where the worker reads a batch's inputs from client system shared memory to: a
    writable buffer of the given size that the backend hands out (a GPU backend's pinned
    staging memory, so that those bytes are copied once, straight to where the copy to the
    device starts). None: into fresh host memory."""

    has_ready_check: bool = False
    """The model has a readiness check of its own (``check_ready``)."""

    def check_ready(self) -> tuple[bool, str]:
        """The model's own answer to "are you ready?" and, when not, why (an error)."""
        return True, ""

    def begin_batch(self) -> None:
        """A batch's inputs are about to be read (buffers from ``host_input`` of the last
        batch are no longer used)."""
        return None  # most backends keep no per-batch input memory

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec) -> Self:
        """Load the model, fully ready to execute; raises ``ServingError`` on failure."""

    @classmethod
    def auto_complete(cls, spec: ModelSpec) -> mc.ModelConfig:
        """The configuration completed from the model itself (inputs, outputs, max batch
        size). The default completes nothing. Runs in a short-lived worker process."""
        return spec.config

    @abstractmethod
    def execute(self, requests: Sequence[WorkRequest]) -> list[WorkResponse]:
        """Run a batch of requests; returns exactly one response per request, in order.

        An exception raised here fails every request of the batch (``INTERNAL`` unless it is
        a ``ServingError``); per-request failures go in ``WorkResponse.error``.
        """

    pipelined: bool = False
    """``launch`` returns before the batch's device work is done, so the worker may read and
    launch the next batch before it waits for this one (a GPU backend with its own stream)."""

    def launch(self, requests: Sequence[WorkRequest]) -> Launched:
        """Start a batch; its ``finish`` waits for it and gives what ``execute`` would (and
        raises what it would). For backends that are not ``pipelined`` the batch has run by
        the time this returns. A batch must be finished before the batch after the next one
        begins (``begin_batch``)."""
        responses = self.execute(requests)
        return Launched(lambda: responses)

    @abstractmethod
    def close(self) -> None:
        """Release the model and any device memory; idempotent."""


class BatchedBackend(Backend):
    """A backend whose runtime takes one tensor per input, batched along dimension 0.

    ``execute`` concatenates the requests of a batch (for batching models) and splits the
    outputs back, so subclasses only implement ``run``.
    """

    batching: bool = False
    ragged: Ragged | None = None
    """Ragged inputs, batch inputs and batch outputs of the configuration (``ragged.plan``);
    subclasses set it at load."""

    @abstractmethod
    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """Execute once on already-batched inputs and return the named outputs."""

    @abstractmethod
    def output_names(self) -> list[str]:
        """Every output the model produces."""

    def run_batch(self, requests: Sequence[WorkRequest], output_names: Sequence[str]) -> dict[str, Array]:
        """Execute once on the inputs of ``requests`` joined along dimension 0 (one request:
        its inputs as they are). The default joins them in memory and calls ``run``; a GPU
        backend may gather them straight into device memory instead."""
        return self.run(merged_inputs(requests), output_names)

    def execute(self, requests: Sequence[WorkRequest]) -> list[WorkResponse]:
        names = self._wanted(requests)
        if self.ragged is not None:
            sizes = [_batch_of(r) for r in requests]
            out = self.run(self.ragged.merge(requests), names)
            parts = self.ragged.split(out, requests, sizes)
            return [WorkResponse(outputs=_select(p, r.requested_outputs)) for p, r in zip(parts, requests, strict=True)]
        if not self.batching and len(requests) > 1:
            return [WorkResponse(outputs=_select(self.run_batch([r], names), r.requested_outputs)) for r in requests]
        return self.split(requests, self.run_batch(requests, names))

    def split(self, requests: Sequence[WorkRequest], out: dict[str, Array]) -> list[WorkResponse]:
        """The responses of ``requests`` from the outputs of their one execution."""
        if len(requests) == 1:
            return [WorkResponse(outputs=_select(out, requests[0].requested_outputs))]
        sizes = [_batch_of(r) for r in requests]
        responses: list[WorkResponse] = []
        start = 0
        for req, n in zip(requests, sizes, strict=True):
            part = {k: v[start : start + n] for k, v in out.items()}
            responses.append(WorkResponse(outputs=_select(part, req.requested_outputs)))
            start += n
        return responses

    def _wanted(self, requests: Sequence[WorkRequest]) -> list[str]:
        asked = dict.fromkeys(tuple(r.requested_outputs) for r in requests)  # mostly one list for all
        if () in asked:
            return self.output_names()
        wanted: dict[str, None] = {}
        for names in asked:
            wanted.update(dict.fromkeys(names))
        return list(wanted)


def merged_inputs(requests: Sequence[WorkRequest], pad: int = 0) -> Mapping[str, Any]:
    """The inputs of ``requests`` joined along dimension 0 (one request: its own), with
    ``pad`` rows of zeros after them (``backends.batchpad``)."""
    if len(requests) == 1 and not pad:
        return requests[0].inputs
    return {k: _concat([r.inputs[k] for r in requests], pad) for k in requests[0].inputs}


def kept_on_device(requests: Sequence[WorkRequest], output_names: Sequence[str]) -> frozenset[str]:
    """The outputs that every request of a batch asking for them wants in CUDA shared memory
    (a GPU backend may leave those on the device)."""
    return frozenset(
        name
        for name in output_names
        if all(name in r.device_outputs for r in requests if not r.requested_outputs or name in r.requested_outputs)
    )


def _concat(arrays: list[Any], pad: int = 0) -> Any:
    """Join along dimension 0, and ``pad`` rows of zeros; CuPy arrays (inputs left in CUDA
    memory) on the device."""
    first = arrays[0]
    if any(is_device_array(a) for a in arrays):
        import cupy  # only backends taking device inputs get here

        parts = [cupy.asarray(as_cupy(a)) for a in arrays]
        if pad:
            parts.append(cupy.zeros((pad, *first.shape[1:]), dtype=first.dtype))
        return cupy.concatenate(parts)
    if pad:
        arrays = [*arrays, np.zeros((pad, *first.shape[1:]), dtype=first.dtype)]
    return np.concatenate(arrays)


def _batch_of(req: WorkRequest) -> int:
    first = next(iter(req.inputs.values()))
    return int(first.shape[0])


def _select(outputs: dict[str, Array], wanted: list[str]) -> dict[str, Array]:
    if not wanted:
        return outputs
    return {k: outputs[k] for k in wanted if k in outputs}
