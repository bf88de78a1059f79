"""ONNX Runtime on a GPU, as Triton's onnxruntime backend configures it, and its runs through
IO binding.

Execution providers: ``optimization.execution_accelerators.gpu_execution_accelerator``
entries ``tensorrt`` (the TensorRT provider first, its parameters mapped to ``trt_*``
provider options as Triton's table maps them) and ``cuda`` (its parameters passed to the
CUDA provider as they are); the model ``parameters`` Triton still reads for the CUDA provider
(``cudnn_conv_algo_search`` 0/1/2, ``gpu_mem_limit``, ``arena_extend_strategy`` 0/1,
``do_copy_in_default_stream``) too. The instance's GPU is the worker's device 0.

IO binding (``IoBindingRun``): inputs that lie in CUDA memory (CUDA shared memory, as
``DeviceView``s or CuPy arrays) are bound where they lie, host inputs are bound as host memory
(the runtime copies them up), outputs that every request of the batch wants in CUDA shared
memory stay on the device (``DeviceView``s of the runtime's buffers, kept alive with them),
the others come back to the host once per batch. A batch's inputs in CUDA shared memory are
joined in one device buffer by one kernel launch (``DeviceGather``, ``workers.cudacopy``).
The TensorRT provider is untested here (no TensorRT libraries).

DESIGN (issue 18): with a CuPy array per request (a view of its region going in, a slice of
the batch's output coming out) and ``cupy.concatenate`` joining them, the worker's main thread
spent 16% of its time building, slicing and joining CuPy arrays (resnet18 export, c=256 over
CUDA shared memory, H200), where only their addresses matter; the PyTorch backend's views
(``workers.devview``) cost a Python object each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.workers.backends.base import ModelSpec
from shoal.workers.cudacopy import SegmentCopier
from shoal.workers.devview import DeviceView, address
from shoal.workers.tensors import is_device_array

TRT_OPTIONS: Final[dict[str, str]] = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
"""Triton's TensorRT parameters whose provider option has another name (``precision_mode``
is mapped on its own; every ``trt_*`` parameter passes as it is)."""
PRECISION: Final[dict[str, str]] = {"FP16": "trt_fp16_enable", "BF16": "trt_bf16_enable", "INT8": "trt_int8_enable"}
CONV_ALGO_SEARCH: Final[dict[str, str]] = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
ARENA_EXTEND: Final[dict[str, str]] = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}
DEVICE: Final = 0
"""The instance's GPU as the worker sees it (CUDA_VISIBLE_DEVICES lists it first)."""


def providers(ort: Any, spec: ModelSpec, graphs: bool = False) -> list[Any]:
    """The providers of a GPU instance, most preferred first (``graphs``: the CUDA provider's
    ``enable_cuda_graph``, ``ortgraphs``); raises ``UNAVAILABLE`` when onnxruntime lacks one
    the configuration asks for. The CUDA and cuDNN libraries of pip's
    ``nvidia-*`` packages are loaded first where onnxruntime can (``preload_dlls``)."""
    available = list(ort.get_available_providers())
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and "CUDAExecutionProvider" in available:
        try:
            preload()
        except Exception:  # noqa: BLE001 - the libraries may be on the loader's path instead
            pass
    cuda: dict[str, str] = {"device_id": str(DEVICE)}
    if graphs:
        cuda["enable_cuda_graph"] = "1"
    params = spec.config.parameters
    for key, table in (("cudnn_conv_algo_search", CONV_ALGO_SEARCH), ("arena_extend_strategy", ARENA_EXTEND)):
        if key in params:
            raw = params[key].string_value.strip()
            if raw not in table:
                raise InvalidInput(
                    f"model '{spec.name}': parameter '{key}' must be one of {', '.join(table)}, got '{raw}'"
                )
            cuda[key] = table[raw]
    for key in ("gpu_mem_limit", "do_copy_in_default_stream"):
        if key in params:
            cuda[key] = params[key].string_value.strip()
    chosen: list[Any] = []
    for acc in spec.config.optimization.execution_accelerators.gpu_execution_accelerator:
        if acc.name == "cuda":
            cuda.update({k: v for k, v in acc.parameters.items()})
        elif acc.name == "tensorrt":
            chosen.append(("TensorrtExecutionProvider", _trt_options(spec, dict(acc.parameters))))
        else:
            raise InvalidInput(
                f"model '{spec.name}': unknown Execution Accelerator '{acc.name}' is requested "
                "(the onnxruntime backend knows 'tensorrt' and 'cuda')"
            )
    chosen.append(("CUDAExecutionProvider", cuda))
    for name, _ in chosen:
        if name not in available:
            raise ServingError(
                f"model '{spec.name}' instance '{spec.instance_name}' needs onnxruntime's {name} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
                + (" built with TensorRT" if name.startswith("Tensorrt") else "")
                + " or use an instance_group of kind KIND_CPU",
                code=ErrorCode.UNAVAILABLE,
            )
    return [*chosen, "CPUExecutionProvider"]


def _trt_options(spec: ModelSpec, params: Mapping[str, str]) -> dict[str, str]:
    options = {"device_id": str(DEVICE)}
    for key, value in params.items():
        if key == "precision_mode":
            mode = value.strip().upper()
            if mode not in PRECISION and mode != "FP32":
                raise InvalidInput(f"model '{spec.name}': unsupported precision mode '{value}' is requested")
            if mode in PRECISION:
                options[PRECISION[mode]] = "True"
        elif key in TRT_OPTIONS:
            options[TRT_OPTIONS[key]] = value
        elif key.startswith("trt_"):
            options[key] = value
        else:
            raise InvalidInput(
                f"model '{spec.name}': unknown parameter '{key}' is provided for TensorRT Execution Accelerator"
            )
    return options


class IoBindingRun:
    """Runs a GPU session through IO binding (see the module docstring)."""

    def __init__(self, session: Any, out_dtypes: Mapping[str, Any], ort: Any = None) -> None:
        self.session = session
        self.run_options: Any = None
        """Given to every run: for a session with CUDA graphs enabled (``ort`` given), runs
        outside a graph (``gpu_graph_id`` -1; without it onnxruntime would capture one)."""
        if ort is not None:
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", "-1")
        self.on_gpu = "CUDAExecutionProvider" in session.get_providers()
        self.out_dtypes = out_dtypes
        """Output name -> numpy dtype of its configured datatype (device outputs' type)."""

    def run(self, feed: Mapping[str, Any], output_names: Sequence[str], keep: frozenset[str]) -> dict[str, Any]:
        io = self.session.io_binding()
        for name, array in feed.items():
            if is_device_array(array):
                array = array if array.flags.c_contiguous else array.copy()
                io.bind_input(name, "cuda", DEVICE, array.dtype, tuple(array.shape), address(array))
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in output_names:
            if self.on_gpu and name in keep and name in self.out_dtypes:
                io.bind_output(name, "cuda", DEVICE)
            else:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io, self.run_options)
        out: dict[str, Any] = {}
        for name, value in zip(output_names, io.get_outputs(), strict=True):
            if value.device_name().lower() == "cuda":
                out[name] = DeviceView(value.data_ptr(), tuple(value.shape()), self.out_dtypes[name], DEVICE, value)
            else:
                out[name] = value.numpy()
        return out


class DeviceGather:
    """Joins a batch's ``DeviceView`` inputs on the instance's GPU into one device buffer."""

    def __init__(self) -> None:
        self.copier = SegmentCopier()
        self._stream: Any = None

    def join(self, parts: Sequence[Any], pad: int) -> Any:
        """``parts`` (one input of each request of a batch) joined along dimension 0 with
        ``pad`` rows of zeros after them: the one view itself when it is the batch, else a
        CuPy array filled by one kernel launch on a stream of this instance, waited for here
        (the session's run follows on its own stream). None when a part is not a view on
        the instance's GPU, or the parts differ in type or in their other dimensions (the
        caller joins them its own way)."""
        first = parts[0]
        if first.__class__ is not DeviceView:
            return None
        tail, dtype = first.shape[1:], first.dtype
        rows = 0
        for p in parts:
            if p.__class__ is not DeviceView or p.device_id != DEVICE or p.shape[1:] != tail or p.dtype != dtype:
                return None
            rows += p.shape[0]
        if len(parts) == 1 and not pad:
            return first
        import cupy

        with cupy.cuda.Device(DEVICE):
            if self._stream is None:
                self._stream = cupy.cuda.Stream(non_blocking=True)
            out = cupy.empty((rows + pad, *tail), dtype=dtype)
            base = pos = out.data.ptr
            segments = []
            for p in parts:
                segments.append((pos, p.ptr, p.nbytes))
                pos += p.nbytes
            self.copier.copy(segments, self._stream)
            if pad:
                cupy.cuda.runtime.memsetAsync(pos, 0, out.nbytes - (pos - base), self._stream.ptr)
            self._stream.synchronize()
        return out


def output_dtypes(config: Any) -> dict[str, Any]:
    """Numpy dtypes of the configured fixed-size outputs (BYTES stays on the host)."""
    out = {}
    for o in config.output:
        dt = dtypes.BY_CONFIG_NUMBER.get(o.data_type)
        if dt is not None and dt.numpy is not None and dt.protocol != "BYTES":
            out[o.name] = dt.numpy
    return out
