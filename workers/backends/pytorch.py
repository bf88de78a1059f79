"""The PyTorch backend (``backend: "pytorch"`` / ``platform: "pytorch_libtorch"``): a
TorchScript module (``model.pt``, saved with ``torch.jit.save``) run with LibTorch's
Python bindings, configured as Triton's PyTorch backend is.

Inputs reach ``forward`` by name when every configured input is a ``forward`` argument;
otherwise by Triton's naming convention ``<name>__<index>`` (the argument position).
Outputs: ``<name>__<index>`` picks element ``index`` of the tuple or list ``forward``
returns (a single tensor is index 0); a returned ``Dict[str, Tensor]`` is matched by name.
A KIND_GPU instance runs on its GPU (``cuda:0`` in the worker) on a CUDA stream of its own
(priority from ``optimization.priority``), with the data path of ``torchgpu``: a batch's
host inputs are gathered into pinned staging and copied up asynchronously into one device
buffer, inputs in CUDA shared memory are used or copied on the device (DLPack, no host
copy), and each output comes back in one device-to-host copy per batch, or stays on the
device when the batch's requests want it in CUDA regions. Model ``parameters``:
``INFERENCE_MODE`` (default true: ``torch.inference_mode``, else ``torch.no_grad``),
``DISABLE_OPTIMIZED_EXECUTION`` (default false) and Shoal's own ``SHOAL_PIPELINE_BATCHES``
(``pipeline.pipelined``). ``optimization { cuda { graphs: true } }`` captures CUDA graphs
(``torchgraphs``). ``torch`` is imported inside ``load`` only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Self

import numpy as np

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.workers.backends import ragged, torchgraphs
from shoal.workers.backends.base import (
    Array,
    BatchedBackend,
    Launched,
    ModelSpec,
    WorkRequest,
    WorkResponse,
    cuda_stream_priority,
    kept_on_device,
    model_file,
)
from shoal.workers.backends.pipeline import pipelined
from shoal.workers.backends.sequenceio import sequence_inputs, state_outputs
from shoal.workers.backends.torchgpu import TorchDevicePath
from shoal.workers.backends.torchgraphs import TorchGraphs

DEFAULT_FILENAME: Final = "model.pt"
log = logging.getLogger("shoal.worker")


def _index(name: str) -> int | None:
    """``index`` of a ``<name>__<index>`` tensor name, else ``None``."""
    _, sep, tail = name.rpartition("__")
    return int(tail) if sep and tail.isdigit() else None


def _bool_param(spec: ModelSpec, key: str, default: bool) -> bool:
    p = spec.config.parameters.get(key)
    if p is None or not p.string_value:
        return default
    value = p.string_value.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise InvalidInput(f"model '{spec.name}': parameter {key} must be true or false, got '{p.string_value}'")
    return value in ("true", "1", "yes", "on")


class PyTorchBackend(BatchedBackend):
    """One TorchScript module on the CPU or on the worker's GPU."""

    kind = "pytorch"

    def __init__(self, spec: ModelSpec, torch: Any, module: Any, device: Any) -> None:
        self._torch = torch
        self._module = module
        self._device = device
        self._name = spec.name
        self.batching = spec.config.max_batch_size > 0
        self.ragged = ragged.plan(spec.config)
        self.device_inputs = spec.device.is_gpu and self.ragged is None
        self._path: TorchDevicePath | None = None
        self.pipelined = pipelined(spec, device.type == "cuda") and self.ragged is None
        if device.type == "cuda" and self.ragged is None:
            self._path = TorchDevicePath(torch, device, priority=cuda_stream_priority(spec))
            self.device_views = self.device_inputs  # read by address only (``TorchDevicePath.gather``)
        elif self.pipelined:
            self._path = TorchDevicePath(torch, device, pin=False)  # the same path, on the CPU
        if self._path is not None:
            self.host_input = self._path.host_input
        self._inference_mode = _bool_param(spec, "INFERENCE_MODE", True)
        cfg = spec.config
        self._outputs = [o.name for o in cfg.output]
        self._outputs += [name for name in state_outputs(cfg) if name not in self._outputs]
        self._input_order = self._bind_inputs(spec, module)
        self._graphs: TorchGraphs | None = None
        if self._path is not None and module is not None:
            self._capture_graphs(spec)
        for name in self._outputs:
            if _index(name) is None and not self._returns_dict(module):
                raise InvalidInput(
                    f"model '{spec.name}': output '{name}' does not follow the <name>__<index> convention "
                    "(needed unless forward returns a Dict[str, Tensor])"
                )

    def _capture_graphs(self, spec: ModelSpec) -> None:
        """CUDA graphs where the configuration asks for them (``torchgraphs``)."""
        path = self._path
        assert path is not None
        shapes = torchgraphs.plan(spec.config, self._input_order)
        if not shapes:
            if spec.config.optimization.cuda.graphs:
                log.warning("model '%s': CUDA graphs need fixed input shapes or a graph_spec; not used", spec.name)
            return
        types = {i.name: dtypes.BY_CONFIG_NUMBER[i.data_type].numpy for i in spec.config.input}
        torch_types = {n: path.torch_dtype(np.dtype(t), n) for n, t in types.items() if t is not None}
        graphs = TorchGraphs(self._torch, path.stream)
        module = self._module
        context = self._torch.inference_mode() if self._inference_mode else self._torch.no_grad()
        with context:
            graphs.capture(shapes, torch_types, self._device, lambda args: module(*args), f"model '{spec.name}'")
        if len(graphs):
            self._graphs = graphs

    @staticmethod
    def _returns_dict(module: Any) -> bool:
        try:
            return bool(module.forward.schema.returns[0].type.kind() == "DictType")
        except (AttributeError, IndexError, RuntimeError):
            return False

    @staticmethod
    def _bind_inputs(spec: ModelSpec, module: Any) -> list[str]:
        """Config input names, the inputs the sequence batcher fills (control and state
        inputs) and the batch inputs, in ``forward``'s argument order."""
        names = [i.name for i in spec.config.input]
        names += [n for n in sequence_inputs(spec.config) if n not in names]
        plan = ragged.plan(spec.config)
        names += [n for n in (plan.model_inputs() if plan else []) if n not in names]
        try:
            args = [a.name for a in module.forward.schema.arguments][1:]  # drop self
        except (AttributeError, RuntimeError):
            args = []
        if args and set(names) <= set(args):
            return [n for n in args if n in names]
        indexed: dict[int, str] = {}
        for n in names:
            i = _index(n)
            if i is not None:
                indexed[i] = n
        if sorted(indexed) != list(range(len(names))):
            raise InvalidInput(
                f"model '{spec.name}': inputs must be named like forward's arguments "
                f"({', '.join(args) or 'unknown'}) or follow the <name>__<index> convention"
            )
        return [indexed[i] for i in range(len(names))]

    @classmethod
    def load(cls, spec: ModelSpec) -> Self:
        try:
            import torch  # type: ignore[import-not-found, unused-ignore]  # heavy runtime
        except ImportError:
            raise ServingError(
                f"model '{spec.name}': PyTorch is not installed in the worker's environment",
                code=ErrorCode.UNAVAILABLE,
            ) from None
        path, shown = model_file(spec, DEFAULT_FILENAME)
        if spec.device.is_gpu:
            if not torch.cuda.is_available():
                raise ServingError(
                    f"model '{spec.name}': instance is KIND_GPU but PyTorch sees no CUDA device",
                    code=ErrorCode.UNAVAILABLE,
                )
            device = torch.device("cuda", 0)  # the worker's own GPU is its device 0
        else:
            device = torch.device("cpu")
        if _bool_param(spec, "DISABLE_OPTIMIZED_EXECUTION", False):
            torch._C._set_graph_executor_optimize(False)
        try:
            module = torch.jit.load(path, map_location=device)  # type: ignore[no-untyped-call, unused-ignore]
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, ...
            raise InvalidInput(f"model '{spec.name}': cannot load TorchScript file '{shown}': {exc}") from None
        module.eval()
        return cls(spec, torch, module, device)

    def _tensor(self, value: Any) -> Any:
        torch = self._torch
        if type(value).__module__.split(".", 1)[0] == "cupy":
            return torch.from_dlpack(value).to(self._device)
        array = np.asarray(value)
        if array.dtype == np.object_:
            raise InvalidInput(f"model '{self._name}': BYTES inputs are not supported by the PyTorch backend")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only views of shared memory
            tensor = torch.from_numpy(array)
        return tensor.to(self._device, non_blocking=False)

    def _array(self, tensor: Any) -> Array:
        tensor = tensor.detach()
        if tensor.is_cuda:
            try:
                import cupy  # GPU outputs stay on the device when CuPy is there

                result: Array = cupy.from_dlpack(tensor.contiguous())
                return result
            except ImportError:
                pass
        return np.asarray(tensor.cpu().numpy())

    def _pick(self, result: Any, output_names: Sequence[str]) -> dict[str, Any]:
        """The tensors of ``output_names`` in what ``forward`` returned."""
        out: dict[str, Any] = {}
        for name in output_names:
            if isinstance(result, dict):
                value = result.get(name)
            else:
                i = _index(name)
                items = result if isinstance(result, list | tuple) else [result]
                value = items[i] if i is not None and i < len(items) else None
            if value is None:
                raise ServingError(
                    f"model '{self._name}': forward returned no tensor for output '{name}'", code=ErrorCode.INTERNAL
                )
            out[name] = value
        return out

    def _forward(self, args: list[Any]) -> Any:
        torch = self._torch
        context = torch.inference_mode() if self._inference_mode else torch.no_grad()
        try:
            with context:
                return self._module(*args)
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported to the client
            raise ServingError(f"model '{self._name}': forward failed: {exc}", code=ErrorCode.INTERNAL) from None

    def _call(self, args: list[Any]) -> tuple[Any, bool]:
        """``forward``, or the captured CUDA graph that takes this batch (then True)."""
        graphs = self._graphs
        rows = int(args[0].shape[0]) if self.batching and args else 0
        found = graphs.find(rows, args, self.batching) if graphs is not None else None
        if graphs is None or found is None:
            return self._forward(args), False
        try:
            return graphs.replay(found, args, rows), True
        except Exception as exc:  # noqa: BLE001 - reported to the client as forward's errors are
            msg = f"model '{self._name}': CUDA graph replay failed: {exc}"
            raise ServingError(msg, code=ErrorCode.INTERNAL) from None

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        missing = [name for name in self._input_order if name not in inputs]
        if missing:
            raise InvalidInput(f"model '{self._name}': the PyTorch backend needs input '{missing[0]}'")

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        if self._path is not None:
            return self._run_on_device({k: [v] for k, v in inputs.items()}, output_names, frozenset())
        self._check_inputs(inputs)
        args = [self._tensor(inputs[name]) for name in self._input_order]
        result = self._forward(args)
        return {name: self._array(value) for name, value in self._pick(result, output_names).items()}

    def begin_batch(self) -> None:
        if self._path is not None:
            self._path.begin_inputs()

    def execute(self, requests: Sequence[WorkRequest]) -> list[WorkResponse]:
        if self._path is not None:
            self._path.begin()
        return super().execute(requests)

    def launch(self, requests: Sequence[WorkRequest]) -> Launched:
        path = self._path
        if not self.pipelined or path is None or (len(requests) > 1 and not self.batching):
            return super().launch(requests)
        path.begin()
        names = self._wanted(requests)
        finish, mark = self._queue_on_device(self._parts(requests), names, kept_on_device(requests, names))
        return Launched(lambda: self.split(requests, finish()), lambda: path.done(mark))

    def run_batch(self, requests: Sequence[WorkRequest], output_names: Sequence[str]) -> dict[str, Array]:
        if self._path is None:
            return super().run_batch(requests, output_names)
        keep = kept_on_device(requests, output_names)
        return self._run_on_device(self._parts(requests), output_names, keep)

    @staticmethod
    def _parts(requests: Sequence[WorkRequest]) -> dict[str, list[Any]]:
        return {name: [r.inputs[name] for r in requests] for name in requests[0].inputs}

    def _run_on_device(
        self, parts: Mapping[str, Sequence[Any]], output_names: Sequence[str], keep: frozenset[str]
    ) -> dict[str, Array]:
        return self._queue_on_device(parts, output_names, keep)[0]()

    def _queue_on_device(
        self, parts: Mapping[str, Sequence[Any]], output_names: Sequence[str], keep: frozenset[str]
    ) -> tuple[Callable[[], dict[str, Array]], Any]:
        """One execution on the instance's GPU through its staging buffers and stream, queued:
        the function returned waits for it and gives the outputs; the mark is its end on the
        stream (``TorchDevicePath.record``)."""
        path = self._path
        assert path is not None
        self._check_inputs(parts)
        torch = self._torch
        context = torch.inference_mode() if self._inference_mode else torch.no_grad()
        try:
            with path.context(), context:
                tensors = path.gather({name: parts[name] for name in self._input_order})
                result, replayed = self._call([tensors[name] for name in self._input_order])
                out = path.fetch(self._pick(result, output_names), keep, kept_copied=replayed)
                mark = path.record()
        except BaseException:
            path.synchronize()  # nothing of the failed batch still runs on its buffers
            raise

        def finish() -> dict[str, Array]:
            path.wait(mark)
            return out

        return finish, mark

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
