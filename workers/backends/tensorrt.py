"""The TensorRT backend (``backend: "tensorrt"`` / ``platform: "tensorrt_plan"``): a
serialized engine (``model.plan``) run with TensorRT's Python API (10.x, named I/O
tensors), device buffers from CuPy.

NOT TESTED HERE: TensorRT's wheels cannot be installed on any machine this project has
(they come from a vendor index that cannot be reached), so this module is written against
the documented API and its tests (tests/gpu/test_tensorrt.py) skip where ``tensorrt`` is
missing. Every I/O tensor of the engine must be in the configuration with the engine's
datatype; the engine's optimization profile 0 is used. Inputs already in CUDA memory (a
client's CUDA shared memory) are used in place; host inputs are copied to the device on the
instance's stream; outputs stay on the device as CuPy arrays (written device to device into
a client's CUDA region, or copied to the host by the worker). ``optimization.priority``
sets the stream priority (PRIORITY_MAX: the device's highest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Self

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends.base import Array, BatchedBackend, ModelSpec, cuda_stream_priority, model_file
from shoal.workers.backends.sequenceio import sequence_inputs, state_outputs

DEFAULT_FILENAME: Final = "model.plan"


def _import(spec: ModelSpec) -> tuple[Any, Any]:
    try:
        import cupy  # heavy runtimes: imported by this backend only
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ServingError(
            f"model '{spec.name}': the TensorRT backend needs the tensorrt and cupy packages ({exc})",
            code=ErrorCode.UNAVAILABLE,
        ) from None
    return trt, cupy


def _engine(trt: Any, spec: ModelSpec) -> tuple[Any, Any]:
    path, shown = model_file(spec, DEFAULT_FILENAME)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    with open(path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise InvalidInput(f"model '{spec.name}': '{shown}' is not a TensorRT engine this TensorRT can deserialize")
    return runtime, engine


def _io(trt: Any, engine: Any) -> dict[str, tuple[bool, str, tuple[int, ...]]]:
    """Engine tensor name -> (is input, protocol datatype, shape with -1 for dynamic)."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        datatype = dtypes.from_numpy(trt.nptype(engine.get_tensor_dtype(name))).protocol
        out[name] = (is_input, datatype, tuple(int(d) for d in engine.get_tensor_shape(name)))
    return out


class TensorRTBackend(BatchedBackend):
    """One TensorRT engine and execution context on the worker's GPU."""

    kind = "tensorrt"
    device_inputs = True

    def __init__(self, spec: ModelSpec, trt: Any, cupy: Any, runtime: Any, engine: Any) -> None:
        self._name = spec.name
        self._cupy = cupy
        self._runtime = runtime
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ServingError(f"model '{spec.name}': cannot create a TensorRT execution context")
        self.batching = spec.config.max_batch_size > 0
        io = _io(trt, engine)
        self._inputs = [n for n, (is_in, _, _) in io.items() if is_in]
        self._outputs = [n for n, (is_in, _, _) in io.items() if not is_in]
        self._types = {n: dtypes.by_protocol(dt).numpy for n, (_, dt, _) in io.items()}
        self._stream = cupy.cuda.Stream(non_blocking=True, priority=cuda_stream_priority(spec))

    @classmethod
    def load(cls, spec: ModelSpec) -> Self:
        if not spec.device.is_gpu:
            raise InvalidInput(f"model '{spec.name}': TensorRT engines run on GPUs only; use KIND_GPU instances")
        trt, cupy = _import(spec)
        cupy.cuda.Device(0).use()  # the worker's own GPU
        runtime, engine = _engine(trt, spec)
        _validate(spec, _io(trt, engine))
        return cls(spec, trt, cupy, runtime, engine)

    @classmethod
    def auto_complete(cls, spec: ModelSpec) -> mc.ModelConfig:
        """Inputs, outputs and max batch size from the engine, when the configuration lacks
        inputs or outputs: batching iff every I/O tensor has a dynamic first dimension; the
        max batch size is then the smallest profile-0 maximum of the inputs' first dimension."""
        cfg = mc.ModelConfig()
        cfg.CopyFrom(spec.config)
        if cfg.input and cfg.output:
            return cfg
        trt, _ = _import(spec)
        _, engine = _engine(trt, spec)
        io = _io(trt, engine)
        batchable = bool(io) and all(shape and shape[0] == -1 for _, _, shape in io.values())
        if batchable and cfg.max_batch_size == 0:
            maxima = [int(engine.get_tensor_profile_shape(n, 0)[2][0]) for n, (is_in, _, _) in io.items() if is_in]
            cfg.max_batch_size = max(1, min(maxima)) if maxima else 1
        batching = cfg.max_batch_size > 0
        for is_input, target in ((True, cfg.input), (False, cfg.output)):
            if len(target):
                continue
            for name, (is_in, datatype, shape) in io.items():
                if is_in != is_input:
                    continue
                t = target.add(name=name, data_type=dtypes.BY_PROTOCOL[datatype].config_number)
                t.dims.extend(shape[1:] if batching else shape)
        return cfg

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        cupy, context = self._cupy, self._context
        keep = []
        with self._stream:
            for name in self._inputs:
                value = inputs.get(name)
                if value is None:
                    raise InvalidInput(f"model '{self._name}': the TensorRT engine needs input '{name}'")
                device = cupy.ascontiguousarray(cupy.asarray(value, dtype=self._types[name]))
                keep.append(device)
                if not context.set_input_shape(name, tuple(device.shape)):
                    raise InvalidInput(
                        f"model '{self._name}': input '{name}' shape {list(device.shape)} is outside the engine's "
                        "optimization profile"
                    )
                context.set_tensor_address(name, device.data.ptr)
            outputs = {}
            for name in self._outputs:  # TensorRT needs an address for every output
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ServingError(f"model '{self._name}': output '{name}' has no shape after the inputs were set")
                outputs[name] = cupy.empty(shape, dtype=self._types[name])
                context.set_tensor_address(name, outputs[name].data.ptr)
            if not context.execute_async_v3(self._stream.ptr):
                raise ServingError(f"model '{self._name}': TensorRT execution failed", code=ErrorCode.INTERNAL)
        self._stream.synchronize()
        del keep
        return {name: outputs[name] for name in output_names}

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None


def _validate(spec: ModelSpec, io: dict[str, tuple[bool, str, tuple[int, ...]]]) -> None:
    """Every configured tensor exists in the engine with its datatype, and the reverse; the
    tensors the sequence batcher fills or keeps (control inputs, state inputs and outputs)
    count as configured, with the datatypes the batcher uses."""
    batch = spec.config.max_batch_size > 0
    for kind, tensors, want_input in (("input", spec.config.input, True), ("output", spec.config.output, False)):
        configured = {t.name: dtypes.BY_CONFIG_NUMBER[t.data_type].protocol for t in tensors}
        filled = sequence_inputs(spec.config) if want_input else state_outputs(spec.config)
        configured.update({n: dt for n, dt in filled.items() if n not in configured})
        engine_names = [n for n, (is_in, _, _) in io.items() if is_in == want_input]
        for name in engine_names:
            if name not in configured:
                raise InvalidInput(f"model '{spec.name}': engine {kind} '{name}' is not in the configuration")
        for name, datatype in configured.items():
            found = io.get(name)
            if found is None or found[0] != want_input:
                raise InvalidInput(f"model '{spec.name}': configured {kind} '{name}' is not an engine {kind}")
            if datatype != found[1]:
                raise InvalidInput(
                    f"model '{spec.name}': {kind} '{name}' is {datatype} in the configuration but {found[1]} "
                    "in the engine"
                )
            if batch and (not found[2] or found[2][0] != -1):
                raise InvalidInput(
                    f"model '{spec.name}': max_batch_size > 0 needs a dynamic first dimension in engine {kind} "
                    f"'{name}' (shape {list(found[2])})"
                )
