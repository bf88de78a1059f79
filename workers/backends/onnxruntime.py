"""The ONNX Runtime backend (``backend: "onnxruntime"``), configured as Triton's is.

``onnxruntime`` is imported inside ``load`` only, so this module imports without it and a
missing runtime fails the load of that model alone. Model ``parameters`` follow Triton's
onnxruntime backend: ``intra_op_thread_count``, ``inter_op_thread_count`` (0 or absent: the
runtime's default, as in Triton), ``execution_mode`` (0 sequential, 1 parallel),
``enable_mem_arena`` and ``enable_mem_pattern``. ``optimization.graph.level`` maps as in
Triton: -1 basic, 0 or absent all, 1 extended, 2 disabled.

Shoal's own ``SHOAL_ORT_BATCH_BUCKETS`` (``pow2``, ``off`` or sizes separated by commas) pads
a batching model's batches to a few sizes (``backends.batchpad``: on a GPU onnxruntime pays
tens of milliseconds whenever the batch size changes); ``pow2`` by default on a GPU for a
model with a dynamic batcher, else ``off``; never for string, ragged or sequence inputs. On a
GPU, inputs from client system shared memory are read into pinned memory and go up in one
copy per input and batch (``backends.ortstaging``). ``SHOAL_PIPELINE_BATCHES`` (``auto``: on
for a session on the CUDA provider with IO binding) runs each batch on a thread of the
backend's own while the worker reads the next (``backends.pipeline``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Self

import numpy as np

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends import batchpad, ortcuda, ortgraphs, ortstaging, ragged, torchgraphs
from shoal.workers.backends.base import (
    Array,
    BatchedBackend,
    Launched,
    ModelSpec,
    WorkRequest,
    kept_on_device,
    merged_inputs,
    model_file,
    relative,
)
from shoal.workers.backends.pipeline import BatchThread, pipelined, switch_interval_us
from shoal.workers.backends.sequenceio import sequence_inputs, state_outputs

log = logging.getLogger("shoal.worker")

DEFAULT_FILENAME: Final = "model.onnx"

ORT_TYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}
"""onnxruntime element type -> protocol datatype name (``proto.dtypes``)."""

GRAPH_IDS_SINCE: Final = (1, 18)
"""onnxruntime's first release with the ``gpu_graph_id`` run option (several CUDA graphs per
session); an older one would replay its one graph for every batch size."""

DEFAULT_MAX_BATCH_SIZE: Final = 4
"""Triton's default-max-batch-size for auto-completed batching models."""

Dims = list[int | None]
"""A model tensor shape: ``None`` for a dynamic (symbolic or unknown) dimension."""


class OnnxRuntimeBackend(BatchedBackend):
    """One ONNX Runtime ``InferenceSession`` on the CPU or on one CUDA device."""

    kind = "onnxruntime"

    def __init__(self, spec: ModelSpec, session: Any, ort: Any = None) -> None:
        self._name = spec.name
        self._session: Any = session
        self.batching = spec.config.max_batch_size > 0
        self.ragged = ragged.plan(spec.config)
        cfg = spec.config
        self._string_inputs = frozenset(i.name for i in cfg.input if i.data_type == mc.TYPE_STRING)
        self._string_outputs = frozenset(o.name for o in cfg.output if o.data_type == mc.TYPE_STRING)
        self._in_reshape = {i.name: list(i.reshape.shape) for i in cfg.input if i.HasField("reshape")}
        self._out_reshape = {o.name: list(o.dims) for o in cfg.output if o.HasField("reshape")}
        self._outputs = [o.name for o in cfg.output] or [o.name for o in session.get_outputs()]
        self._outputs += [name for name in state_outputs(cfg) if name not in self._outputs]
        self._io: ortcuda.IoBindingRun | None = None
        self._staging: ortstaging.PinnedStaging | None = None
        self._gather: ortcuda.DeviceGather | None = None
        on_gpu = "CUDAExecutionProvider" in session.get_providers() and spec.device.is_gpu
        if on_gpu and self.ragged is None and not self._string_inputs and not self._string_outputs:
            self._io = ortcuda.IoBindingRun(session, ortcuda.output_dtypes(cfg), ort)
            self.device_inputs = True  # CUDA shared memory is bound where it lies
            if importlib.util.find_spec("cupy") is not None:
                self._staging = ortstaging.PinnedStaging()
                self.host_input = self._staging.take  # client shared memory read into pinned memory
                self._gather = ortcuda.DeviceGather()
                self.device_views = True  # CUDA shared memory read by address (``DeviceGather``)
        self._graphs: ortgraphs.OrtGraphs | None = None
        if self._io is not None and self._gather is not None and ort is not None and _wants_graphs(spec):
            self._capture_graphs(ort, spec)
        self._buckets = _buckets(spec, on_gpu)
        # onnxruntime's graphs are per thread, captured in CUDA's global mode: one thread runs them
        self.pipelined = pipelined(spec, self._io is not None) and self.ragged is None and self._graphs is None
        self._thread = BatchThread(spec.name, switch_interval_us(spec)) if self.pipelined else None

    @classmethod
    def load(cls, spec: ModelSpec) -> Self:
        """Create the session for ``spec`` and check the configuration against the model."""
        try:
            import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            raise ServingError(
                f"model '{spec.name}': onnxruntime is not installed; install shoal[onnx]",
                code=ErrorCode.UNAVAILABLE,
            ) from None
        path, shown = model_file(spec, DEFAULT_FILENAME)
        graphs = spec.device.is_gpu and _wants_graphs(spec)
        if graphs and _version(ort.__version__) < GRAPH_IDS_SINCE:
            since = ".".join(map(str, GRAPH_IDS_SINCE))
            log.warning("model '%s': CUDA graphs need onnxruntime %s or later (one graph per batch size), "
                        "not %s; serving without them", spec.name, since, ort.__version__)  # fmt: skip
            graphs = False
        try:
            session = _session(ort, spec, path, shown, graphs)
        except ServingError as exc:
            if not graphs or exc.code is not ErrorCode.INVALID_ARGUMENT:
                raise
            log.warning("model '%s': onnxruntime cannot use CUDA graphs for it, serving without them: %s",
                        spec.name, exc.message)  # fmt: skip
            graphs = False
            session = _session(ort, spec, path, shown, graphs)
        if spec.device.is_gpu and "CUDAExecutionProvider" not in session.get_providers():
            raise ServingError(
                f"model '{spec.name}' instance '{spec.instance_name}': onnxruntime could not start "
                f"CUDAExecutionProvider on GPU {spec.device.index} (CUDA or cuDNN libraries missing?)",
                code=ErrorCode.UNAVAILABLE,
            )
        _validate(spec, session)
        return cls(spec, session, ort if graphs else None)

    def _capture_graphs(self, ort: Any, spec: ModelSpec) -> None:
        """CUDA graphs where the configuration asks for them and the session could enable them
        (``ortgraphs``)."""
        assert self._io is not None
        shapes = torchgraphs.plan(spec.config, [i.name for i in spec.config.input])
        if not shapes:
            log.warning("model '%s': CUDA graphs need fixed input shapes or a graph_spec; not used", spec.name)
            return
        types = {i.name: dtypes.BY_CONFIG_NUMBER[i.data_type].numpy for i in spec.config.input}
        by_output = {o.name: ORT_TYPES.get(o.type, "") for o in self._session.get_outputs()}

        def out_dtype(name: str) -> Any:
            return dtypes.BY_PROTOCOL[by_output[name]].numpy

        graphs = ortgraphs.OrtGraphs(ort, self._session, self.batching, self._io.run_options)
        graphs.capture(shapes, types, out_dtype, f"model '{spec.name}'")
        if len(graphs):
            self._graphs = graphs

    @classmethod
    def auto_complete(cls, spec: ModelSpec) -> mc.ModelConfig:
        """Triton's ONNX Runtime auto-complete: only when inputs or outputs are missing.
        Batching is possible iff every input and output has a dynamic first dimension; then
        an unset (0) max_batch_size becomes 4, the first dimension leaves ``dims``, and
        ``dynamic_batching`` is enabled when no scheduler is configured."""
        cfg = mc.ModelConfig()
        cfg.CopyFrom(spec.config)
        if cfg.input and cfg.output:
            return cfg
        import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

        path = os.path.join(spec.version_dir, cfg.default_model_filename or DEFAULT_FILENAME)
        if not os.path.isfile(path):
            raise ServingError(
                f"model '{spec.name}': cannot complete the configuration: model file "
                f"'{relative(path, spec.repository)}' not found",
                code=ErrorCode.NOT_FOUND,
            )
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        tensors = list(session.get_inputs()) + list(session.get_outputs())
        batchable = bool(tensors) and all(len(t.shape) > 0 and _model_dims(t.shape)[0] is None for t in tensors)
        if cfg.max_batch_size > 0 and not batchable:
            raise ServingError(
                f"model '{spec.name}': max_batch_size {cfg.max_batch_size} needs a dynamic first dimension "
                "in every input and output of the model",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        if cfg.max_batch_size == 0 and batchable:
            # --backend-config=[onnxruntime,]default-max-batch-size=N (0: no batching)
            cfg.max_batch_size = int(spec.backend_config.get("default-max-batch-size", DEFAULT_MAX_BATCH_SIZE))
        batching = cfg.max_batch_size > 0
        for target, model_tensors in ((cfg.input, session.get_inputs()), (cfg.output, session.get_outputs())):
            if len(target):
                continue
            for t in model_tensors:
                dtype = ORT_TYPES.get(t.type)
                if dtype is None:
                    raise ServingError(
                        f"model '{spec.name}': cannot complete the configuration: '{t.name}' has "
                        f"unsupported type {t.type}",
                        code=ErrorCode.INVALID_ARGUMENT,
                    )
                dims = [-1 if d is None else d for d in _model_dims(t.shape)]
                if batching:
                    dims = dims[1:]
                entry = target.add(name=t.name, data_type=dtypes.BY_PROTOCOL[dtype].config_number)
                if dims:
                    entry.dims.extend(dims)
                else:
                    entry.dims.append(1)
                    if batching:
                        entry.reshape.SetInParent()
        if cfg.max_batch_size > 1 and cfg.WhichOneof("scheduling_choice") is None:
            cfg.dynamic_batching.SetInParent()
        return cfg

    def run_batch(self, requests: Sequence[WorkRequest], output_names: Sequence[str]) -> dict[str, Array]:
        return self._prepared(requests, output_names)()

    def launch(self, requests: Sequence[WorkRequest]) -> Launched:
        """A pipelined batch: its inputs joined (and copied up) here, its run on the
        backend's thread (``pipeline.BatchThread``)."""
        thread = self._thread
        if thread is None or (len(requests) > 1 and not self.batching):
            return super().launch(requests)
        names = self._wanted(requests)
        run = self._prepared(requests, names)
        return thread.launch(lambda: self.split(requests, run()))

    def _prepared(self, requests: Sequence[WorkRequest], output_names: Sequence[str]) -> Callable[[], dict[str, Array]]:
        """The batch's inputs joined (padded to a bucket, on the device where bound), and
        the run of them that gives the requests' rows of each output."""
        pad = rows = 0
        if self._buckets is not None and all(r.inputs for r in requests):
            rows = sum(int(next(iter(r.inputs.values())).shape[0]) for r in requests)
            pad = self._buckets.size_for(rows) - rows
        if self._io is None or self._session is None:
            inputs = merged_inputs(requests, pad)
            return lambda: _rows(self.run(inputs, output_names), rows, pad)
        inputs = self._merged(requests, pad)
        keep = kept_on_device(requests, output_names)
        return lambda: _rows(self._run_bound(inputs, output_names, keep), rows, pad)

    def begin_batch(self) -> None:
        if self._staging is not None:
            self._staging.begin()

    def _merged(self, requests: Sequence[WorkRequest], pad: int) -> Mapping[str, Any]:
        """The batch's inputs, each joined on the device in one piece: CUDA-shared-memory
        views by one kernel launch (``ortcuda.DeviceGather``), arrays read into the pinned
        staging by one copy up (``ortstaging``); anything else joined on the host (or by CuPy)
        as before."""
        gather, staging = self._gather, self._staging
        if (gather is None and staging is None) or not requests or not requests[0].inputs:
            return merged_inputs(requests, pad)
        out: dict[str, Any] = {}
        host: dict[str, list[Any]] = {}
        for name in requests[0].inputs:
            parts = [r.inputs[name] for r in requests]
            joined = gather.join(parts, pad) if gather is not None else None
            if joined is None:
                host[name] = parts
            else:
                out[name] = joined
        if host:
            staged = staging.batch_inputs(host, pad) if staging is not None else None
            if staged is None:
                merged = merged_inputs(requests, pad)
                if self._thread is None or len(requests) > 1 or pad:
                    return merged
                # one request's own arrays, maybe in the staging buffer, which the next batch
                # fills while this one runs on the backend's thread: copied
                return {k: np.array(v) if type(v) is np.ndarray else v for k, v in merged.items()}
            out.update(staged)
        return out

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """Run the session once on already-batched inputs."""
        session = self._session
        if session is None:
            raise ServingError(f"model '{self._name}' is closed", code=ErrorCode.UNAVAILABLE)
        if self._io is not None:
            return self._run_bound(inputs, output_names, frozenset())
        feed: dict[str, Array] = {}
        for name, array in inputs.items():
            if name in self._string_inputs or array.dtype == np.object_:
                array = _to_ort_strings(name, array)
            shape = self._in_reshape.get(name)
            if shape is not None:
                array = _reshape(array, shape, self.batching)
            feed[name] = array
        try:
            results = session.run(list(output_names), feed)
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are pybind types, told apart by name
            code = ErrorCode.INVALID_ARGUMENT if type(exc).__name__ == "InvalidArgument" else ErrorCode.INTERNAL
            raise ServingError(f"model '{self._name}': onnxruntime: {exc}", code=code) from None
        out: dict[str, Array] = {}
        for name, value in zip(output_names, results, strict=True):
            array = np.asarray(value)
            if array.dtype == np.object_:
                array = _from_ort_strings(array)
            shape = self._out_reshape.get(name)
            if shape is not None:
                array = _reshape(array, shape, self.batching)
            out[name] = array
        return out

    def _run_bound(
        self, inputs: Mapping[str, Array], output_names: Sequence[str], keep: frozenset[str]
    ) -> dict[str, Array]:
        """A GPU session's run through IO binding (``ortcuda``); ``keep``: outputs left on the
        device."""
        assert self._io is not None
        feed = {}
        for name, array in inputs.items():
            shape = self._in_reshape.get(name)
            feed[name] = _reshape(array, shape, self.batching) if shape is not None else array
        try:
            graphs = self._graphs
            g = graphs.find(feed, output_names) if graphs is not None else None
            if g is not None:
                assert graphs is not None
                results = graphs.run(g, feed, output_names, keep)
            else:
                results = self._io.run(feed, list(output_names), keep)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are pybind types, told apart by name
            code = ErrorCode.INVALID_ARGUMENT if type(exc).__name__ == "InvalidArgument" else ErrorCode.INTERNAL
            raise ServingError(f"model '{self._name}': onnxruntime: {exc}", code=code) from None
        for name, shape in self._out_reshape.items():
            if name in results:
                results[name] = _reshape(results[name], shape, self.batching)
        return results

    def output_names(self) -> list[str]:
        """The outputs of the configuration (the model's own when the config lists none) and
        the state outputs of ``sequence_batching``."""
        return list(self._outputs)

    def close(self) -> None:
        """Drop the session once no batch runs; onnxruntime frees its memory when the last
        reference goes."""
        if self._thread is not None:
            self._thread.close()
        self._session = None
        self._graphs = None  # its bindings and static buffers hold the session too


def _rows(out: dict[str, Array], rows: int, pad: int) -> dict[str, Array]:
    """The outputs without the rows of ``pad`` (a padded batch's first ``rows``)."""
    return {k: v[:rows] for k, v in out.items()} if pad else out


def _parameter(spec: ModelSpec, key: str) -> str | None:
    if key in spec.config.parameters:
        return spec.config.parameters[key].string_value.strip()
    if key in spec.backend_config:
        return spec.backend_config[key].strip()
    return None


def _int_parameter(spec: ModelSpec, key: str, allowed: Sequence[int] | None = None) -> int:
    raw = _parameter(spec, key)
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (allowed is not None and value not in allowed):
        expected = " or ".join(map(str, allowed)) if allowed is not None else "a non-negative integer"
        raise ServingError(
            f"model '{spec.name}': parameter '{key}' must be {expected}, got '{raw}'",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    return value


def _bool_parameter(spec: ModelSpec, key: str) -> bool | None:
    raw = _parameter(spec, key)
    if raw is None:
        return None
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ServingError(
        f"model '{spec.name}': parameter '{key}' must be true or false, got '{raw}'",
        code=ErrorCode.INVALID_ARGUMENT,
    )


def _session_options(ort: Any, spec: ModelSpec) -> Any:
    """SessionOptions as Triton's onnxruntime backend derives them from the config."""
    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cfg = spec.config
    if cfg.HasField("optimization") and cfg.optimization.HasField("graph"):
        level = {
            -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }.get(cfg.optimization.graph.level, level)
    options.graph_optimization_level = level
    if _int_parameter(spec, "execution_mode", (0, 1)) == 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    else:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # 0 leaves the choice to onnxruntime (one thread per physical core), as Triton does.
    options.intra_op_num_threads = _int_parameter(spec, "intra_op_thread_count")
    options.inter_op_num_threads = _int_parameter(spec, "inter_op_thread_count")
    arena = _bool_parameter(spec, "enable_mem_arena")
    if arena is not None:
        options.enable_cpu_mem_arena = arena
    pattern = _bool_parameter(spec, "enable_mem_pattern")
    if pattern is not None:
        options.enable_mem_pattern = pattern
    return options


def _buckets(spec: ModelSpec, on_gpu: bool) -> batchpad.BatchBuckets | None:
    """The batch padding of ``SHOAL_ORT_BATCH_BUCKETS``; by default ``pow2`` for a GPU session
    of a model with a dynamic batcher (which joins requests, so its rows are independent; a
    model without one may compute across the rows a client sends), with the batcher's
    ``preferred_batch_size``s added (a batch the batcher formed at a preferred size runs
    unpadded), else none. None: no padding (also for models that do not batch, or have
    string, ragged or sequence inputs)."""
    cfg = spec.config
    raw = _parameter(spec, "SHOAL_ORT_BATCH_BUCKETS")
    preferred: list[int] = []
    if raw is None:
        raw = "pow2" if on_gpu and cfg.HasField("dynamic_batching") else "off"
        preferred = [n for n in cfg.dynamic_batching.preferred_batch_size if 0 < n <= cfg.max_batch_size]
    try:
        sizes = batchpad.parse_buckets(raw, max(cfg.max_batch_size, 1))
        if sizes is not None and preferred:
            sizes = sorted(set(sizes) | set(preferred))
    except ValueError as exc:
        raise ServingError(
            f"model '{spec.name}': parameter 'SHOAL_ORT_BATCH_BUCKETS': {exc}", code=ErrorCode.INVALID_ARGUMENT
        ) from None
    eligible = cfg.max_batch_size > 0 and not cfg.HasField("sequence_batching") and not ragged.plan(cfg)
    eligible = eligible and not any(i.data_type == mc.TYPE_STRING for i in cfg.input)
    return batchpad.BatchBuckets(sizes) if sizes is not None and eligible else None


def _session(ort: Any, spec: ModelSpec, path: str, shown: str, graphs: bool) -> Any:
    """The session (``graphs``: with the CUDA provider's graph capture enabled); a provider
    onnxruntime lacks fails ``UNAVAILABLE``, a model it cannot load ``INVALID_ARGUMENT``."""
    options, providers = _session_options(ort, spec), _providers(ort, spec, graphs)
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        message = str(exc).replace(os.path.abspath(spec.repository) + os.sep, "")
        raise ServingError(
            f"model '{spec.name}': onnxruntime cannot load '{shown}': {message}",
            code=ErrorCode.INVALID_ARGUMENT,
        ) from None


def _version(text: str) -> tuple[int, ...]:
    """The leading numbers of a version string ("1.31.1" -> (1, 31, 1); "1.18.0rc1" -> (1, 18))."""
    out = []
    for part in text.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def _wants_graphs(spec: ModelSpec) -> bool:
    """``optimization.cuda.graphs`` on, for a session that binds its tensors (``ortgraphs``)."""
    cfg = spec.config
    strings = any(t.data_type == mc.TYPE_STRING for t in cfg.input) or any(
        t.data_type == mc.TYPE_STRING for t in cfg.output
    )
    plain = not ragged.plan(cfg) and not strings
    return cfg.optimization.cuda.graphs and plain and importlib.util.find_spec("cupy") is not None


def _providers(ort: Any, spec: ModelSpec, graphs: bool = False) -> list[Any]:
    if not spec.device.is_gpu:
        return ["CPUExecutionProvider"]
    return ortcuda.providers(ort, spec, graphs)


def _model_dims(shape: Sequence[Any]) -> Dims:
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _check_tensor(
    spec: ModelSpec,
    kind: str,
    name: str,
    data_type: mc.DataType.ValueType,
    dims: Sequence[int] | None,
    model_type: str,
    model_shape: Dims,
) -> None:
    """Raise INVALID_ARGUMENT when one config tensor disagrees with the model's (``dims``
    None: its datatype only)."""
    want = dtypes.BY_CONFIG_NUMBER.get(data_type)
    want_name = want.config_name if want is not None else mc.DataType.Name(data_type)
    have = ORT_TYPES.get(model_type)
    if want is None or have != want.protocol:
        have_name = dtypes.BY_PROTOCOL[have].config_name if have is not None else "unsupported"
        raise ServingError(
            f"model '{spec.name}': {kind} '{name}' has data type {want_name} in the configuration "
            f"but {model_type} ({have_name}) in the model",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    if dims is None:
        return  # a ragged input or a scattered batch output: 1-D in the model, any shape here
    batching = spec.config.max_batch_size > 0
    shown = ("[-1, " if batching else "[") + ", ".join(map(str, dims)) + "]"
    model_shown = "[" + ", ".join("-1" if d is None else str(d) for d in model_shape) + "]"
    expected = len(dims) + (1 if batching else 0)
    if len(model_shape) != expected:
        raise ServingError(
            f"model '{spec.name}': {kind} '{name}' has shape {shown} in the configuration "
            f"but {model_shown} in the model (rank {len(model_shape)}, expected {expected})",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    if batching and model_shape[0] is not None:
        raise ServingError(
            f"model '{spec.name}': {kind} '{name}' has a fixed first dimension {model_shown} in the model, "
            "but max_batch_size > 0 needs a variable batch dimension (or set max_batch_size: 0)",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    for cfg_dim, model_dim in zip(dims, model_shape[1:] if batching else model_shape, strict=True):
        if cfg_dim >= 0 and model_dim is not None and cfg_dim != model_dim:
            raise ServingError(
                f"model '{spec.name}': {kind} '{name}' has shape {shown} in the configuration "
                f"but {model_shown} in the model",
                code=ErrorCode.INVALID_ARGUMENT,
            )


def _check_filled(spec: ModelSpec, kind: str, name: str, datatype: str, model_type: str) -> None:
    """A control or state tensor's datatype (as the sequence batcher sends or keeps it)
    against the model's."""
    have = ORT_TYPES.get(model_type)
    if have != datatype:
        raise ServingError(
            f"model '{spec.name}': sequence_batching {kind} '{name}' is {datatype} in the configuration "
            f"but {model_type} in the model",
            code=ErrorCode.INVALID_ARGUMENT,
        )


def _validate(spec: ModelSpec, session: Any) -> None:
    """Check every config input and output against the session's inputs and outputs. Model
    inputs the sequence batcher fills (control and state inputs) need not be config inputs,
    nor state outputs config outputs; their datatypes must match the configuration's."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    model_outputs = {o.name: o for o in session.get_outputs()}
    cfg = spec.config
    for inp in cfg.input:
        m = model_inputs.get(inp.name)
        if m is None:
            raise ServingError(
                f"model '{spec.name}': configuration input '{inp.name}' is not an input of the model "
                f"(model inputs: {', '.join(model_inputs) or 'none'})",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        dims = list(inp.reshape.shape) if inp.HasField("reshape") else list(inp.dims)
        shape = None if inp.allow_ragged_batch else dims
        _check_tensor(spec, "input", inp.name, inp.data_type, shape, m.type, _model_dims(m.shape))
    configured = {i.name for i in cfg.input}
    filled = sequence_inputs(cfg)
    plan = ragged.plan(cfg)
    made = set(plan.model_inputs()) if plan else set()
    missing = [n for n in model_inputs if n not in configured and n not in filled and n not in made]
    if missing:
        raise ServingError(
            f"model '{spec.name}': model input '{missing[0]}' is missing from the configuration",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    for name, datatype in filled.items():
        m = model_inputs.get(name)
        if m is None:
            raise ServingError(
                f"model '{spec.name}': sequence_batching input '{name}' is not an input of the model "
                f"(model inputs: {', '.join(model_inputs) or 'none'})",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        _check_filled(spec, "input", name, datatype, m.type)
    for name, datatype in state_outputs(cfg).items():
        m = model_outputs.get(name)
        if m is None:
            raise ServingError(
                f"model '{spec.name}': sequence_batching state output '{name}' is not an output of the model "
                f"(model outputs: {', '.join(model_outputs) or 'none'})",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        _check_filled(spec, "output", name, datatype, m.type)
    for out in cfg.output:
        m = model_outputs.get(out.name)
        if m is None:
            raise ServingError(
                f"model '{spec.name}': configuration output '{out.name}' is not an output of the model "
                f"(model outputs: {', '.join(model_outputs) or 'none'})",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        dims = list(out.reshape.shape) if out.HasField("reshape") else list(out.dims)
        shape = None if plan is not None and out.name in plan.scatter else dims
        _check_tensor(spec, "output", out.name, out.data_type, shape, m.type, _model_dims(m.shape))


def _reshape(array: Array, shape: Sequence[int], batching: bool) -> Array:
    target = ([array.shape[0]] if batching else []) + list(shape)
    return array.reshape(target) if sum(1 for d in target if d < 0) <= 1 else array


def _to_ort_strings(name: str, array: Array) -> Array:
    """BYTES (object array of ``bytes``) -> object array of ``str``, which is what onnxruntime
    takes for ``tensor(string)`` (it would ``str()`` a ``bytes`` element, giving ``"b'..'"``)."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.object_)
    for i, item in enumerate(flat.tolist()):
        if isinstance(item, str):
            out[i] = item
            continue
        try:
            out[i] = bytes(item).decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            raise InvalidInput(
                f"input '{name}': element {i} is not valid UTF-8, which onnxruntime string tensors require"
            ) from None
    return out.reshape(array.shape)


def _from_ort_strings(array: Array) -> Array:
    """onnxruntime's ``str`` elements back to the ``bytes`` elements of a BYTES tensor."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.object_)
    for i, item in enumerate(flat.tolist()):
        out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out.reshape(array.shape)
