"""The Python backend: runs Triton Python-backend models (``model.py`` with a
``TritonPythonModel`` class) unchanged, in the worker process.

The model imports ``triton_python_backend_utils`` (Shoal's version, in ``workers/pb``); this
module imports the very same top-level module so that the model's ``InferenceResponse`` and
``TritonError`` are the classes checked here.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar, Final, Self

import numpy as np

from shoal.proto import errortexts as T
from shoal.proto.config_json import config_from_json, config_to_json
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends import pyenv
from shoal.workers.backends.base import Array, Backend, ModelSpec, WorkRequest, WorkResponse

_LOG: Final = logging.getLogger(__name__)
PB_DIR: Final = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pb")
_MODULE_IDS: Final = itertools.count()

# TritonError code -> ErrorCode; anything else is INTERNAL.
_ERROR_CODES: Final = {
    2: ErrorCode.NOT_FOUND,
    3: ErrorCode.INVALID_ARGUMENT,
    4: ErrorCode.UNAVAILABLE,
    5: ErrorCode.UNIMPLEMENTED,
    6: ErrorCode.ALREADY_EXISTS,
    7: ErrorCode.CANCELLED,
}


def pb_utils() -> ModuleType:
    """The ``triton_python_backend_utils`` module models import (puts ``workers/pb`` on the path)."""
    if PB_DIR not in sys.path:
        sys.path.insert(0, PB_DIR)
    return importlib.import_module("triton_python_backend_utils")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PythonBackend(Backend):
    """One instance of a Triton Python-backend model."""

    kind: ClassVar[str] = "python"
    reads_cancel = True  # ``request.is_cancelled()``

    def __init__(self, spec: ModelSpec, module: ModuleType, model: Any, added_path: str | None) -> None:
        self._spec = spec
        self._module = module
        self._model = model
        self._added_path = added_path
        self._pb = pb_utils()
        self._output_names = [o.name for o in spec.config.output]
        self._no_trace = self._pb.InferenceTrace()
        """An untraced request's ``trace()`` (one object for all: it holds nothing)."""
        self._bytes_code = 13
        self._closed = False
        self._decoupled = spec.config.model_transaction_policy.decoupled
        self._iterative = spec.config.sequence_batching.iterative_sequence
        self.has_ready_check = callable(getattr(model, "is_ready", None))
        self._loop: asyncio.AbstractEventLoop | None = None
        """Runs ``async def execute`` (created on first use)."""

    @classmethod
    def auto_complete(cls, spec: ModelSpec) -> mc.ModelConfig:
        """Call the model's static ``auto_complete_config(config)`` when it has one."""
        path = os.path.join(spec.version_dir, spec.config.default_model_filename or "model.py")
        if not os.path.isfile(path):
            return spec.config
        pb = pb_utils()
        pyenv.activate(spec)  # a short-lived process: its sys.path goes with it
        sys.path.insert(0, spec.version_dir)
        try:
            module = _import_file(f"_shoal_autocomplete_{next(_MODULE_IDS)}", path)
            hook = getattr(getattr(module, "TritonPythonModel", None), "auto_complete_config", None)
            if hook is None:
                return spec.config
            completed = hook(pb.ModelConfig(config_to_json(spec.config)))
            return config_from_json(completed.as_dict())
        except ServingError:
            raise
        except Exception as exc:
            raise ServingError(
                f"model '{spec.name}': auto_complete_config failed: {_describe(exc)}", code=ErrorCode.INVALID_ARGUMENT
            ) from exc
        finally:
            sys.path.remove(spec.version_dir)

    @classmethod
    def load(cls, spec: ModelSpec) -> Self:
        """Import ``model.py``, instantiate ``TritonPythonModel`` and call its ``initialize``."""
        filename = spec.config.default_model_filename or "model.py"
        path = os.path.join(spec.version_dir, filename)
        if not os.path.isfile(path):
            rel = os.path.relpath(path, spec.repository)
            raise ServingError(
                f"model '{spec.name}': Python model file '{rel}' not found in the model repository",
                code=ErrorCode.NOT_FOUND,
            )
        pb_utils()
        pyenv.activate(spec)  # EXECUTION_ENV_PATH: the model's own packages first
        added: str | None = None
        if spec.version_dir not in sys.path:
            sys.path.insert(0, spec.version_dir)
            added = spec.version_dir
        module_name = f"_shoal_python_model_{re.sub(r'[^0-9A-Za-z_]', '_', spec.name)}_{next(_MODULE_IDS)}"
        try:
            module = _import_file(module_name, path)
            model_cls = getattr(module, "TritonPythonModel", None)
            if model_cls is None:
                raise AttributeError(f"'{filename}' defines no class TritonPythonModel")
            model = model_cls()
            backend = cls(spec, module, model, added)
            pb = backend._pb
            pb._set_bls(functools.partial(_bls_exec, pb, spec.bls) if spec.bls is not None else None, spec.bls)
            pb._set_metrics(spec.metrics)
            backend.device_inputs = backend._device_inputs_wanted()
            init = getattr(model, "initialize", None)
            if init is not None:
                init(backend._initialize_args())
        except Exception as exc:
            _LOG.error("model '%s': loading %s failed", spec.name, filename, exc_info=True)
            sys.modules.pop(module_name, None)
            if added is not None and added in sys.path:
                sys.path.remove(added)
            raise ServingError(
                f"model '{spec.name}': failed to load Python model: {_describe(exc)}", code=ErrorCode.INTERNAL
            ) from exc
        return backend

    def _initialize_args(self) -> dict[str, str]:
        spec = self._spec
        gpu = spec.device.is_gpu
        return {
            "model_config": json.dumps(config_to_json(spec.config)),
            "model_instance_kind": spec.device.kind,
            "model_instance_name": spec.instance_name,
            # a GPU worker sees its own GPU as device 0 (CUDA_VISIBLE_DEVICES lists it first)
            "model_instance_device_id": str(max(spec.device.index, 0)) if gpu else "0",
            "model_repository": spec.model_dir,
            "model_version": str(spec.version),
            "model_name": spec.name,
        }

    def execute(self, requests: Sequence[WorkRequest]) -> list[WorkResponse]:
        """Call the model's ``execute`` on the batch and convert its responses."""
        if self._closed:
            raise ServingError(f"model '{self._spec.name}': instance is closed", code=ErrorCode.UNAVAILABLE)
        pb_requests = [self._to_pb_request(r) for r in requests]
        try:
            responses = self._model.execute(pb_requests)
            # async def execute: on the worker's own loop (a list, the common answer, is not one)
            if responses.__class__ is not list and inspect.iscoroutine(responses):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                responses = self._loop.run_until_complete(responses)
        except ServingError:
            raise
        except self._pb.TritonError as exc:
            _LOG.error("model '%s': execute raised", self._spec.name, exc_info=True)
            code = _ERROR_CODES.get(exc.code(), ErrorCode.INTERNAL)
            raise ServingError(_describe(exc), code=code) from exc
        except Exception as exc:
            _LOG.error("model '%s': execute raised", self._spec.name, exc_info=True)
            raise ServingError(_describe(exc), code=ErrorCode.INTERNAL) from exc
        if self._decoupled:
            if responses is not None:
                raise ServingError(
                    f"Python model '{self._spec.name}' is using the decoupled mode and the execute function "
                    "must return None.",
                    code=ErrorCode.INTERNAL,
                )
            for pb_req, req in zip(pb_requests, requests, strict=True):
                if self._reschedules(pb_req, req) is not None and req.send is not None:
                    req.send(WorkResponse(error=T.RESCHEDULE_NOT_CONFIGURED()), True)
            return []  # the responses go through each request's sender
        if not isinstance(responses, (list, tuple)) or len(responses) != len(requests):
            got = f"{len(responses)} responses" if isinstance(responses, (list, tuple)) else repr(type(responses))
            raise ServingError(
                f"model '{self._spec.name}': execute returned {got} for {len(requests)} requests "
                "(it must return a list of one InferenceResponse per request)",
                code=ErrorCode.INTERNAL,
            )
        out = []
        for resp, pb_req, req in zip(responses, pb_requests, requests, strict=True):
            refused = self._reschedules(pb_req, req)
            if refused is not None:
                out.append(WorkResponse(error=refused))
            elif not req.rescheduled:
                out.append(self._to_work_response(resp, req))
            elif resp is not None:
                why = "execute returned a response for a request released with RESCHEDULE (its entry must be None)"
                err = ServingError(f"model '{self._spec.name}': {why}", code=ErrorCode.INTERNAL)
                out.append(WorkResponse(error=err))
                req.rescheduled = False  # answered with that error: the request ends
            else:
                out.append(WorkResponse())
        return out

    def check_ready(self) -> tuple[bool, str]:
        """The model's ``is_ready()`` (or ``async def is_ready``), as python_backend calls it
        for a readiness request: it must return a bool; raising means not ready."""
        try:
            answer = self._model.is_ready()
            if inspect.iscoroutine(answer):
                answer = asyncio.run(answer)  # this thread's own loop: execute's is the main thread's
        except Exception as exc:  # noqa: BLE001 - the model's own failure: not ready, and why
            _LOG.error("model '%s': is_ready() raised", self._spec.name, exc_info=True)
            return False, f"is_ready() raised {_describe(exc)}"
        if not isinstance(answer, bool):
            kind = type(answer).__name__
            _LOG.error("model '%s': is_ready() must return a boolean value, not %s", self._spec.name, kind)
            return False, "is_ready() must return a boolean value"
        return answer, ""

    def _reschedules(self, pb_req: Any, req: WorkRequest) -> ServingError | None:
        """Marks ``req`` rescheduled when the model released it with RESCHEDULE and its
        configuration has iterative sequences; Triton's error when it has not."""
        if not pb_req._release_flags & self._pb.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            return None
        if not self._iterative:
            return T.RESCHEDULE_NOT_CONFIGURED()
        req.rescheduled = True
        return None

    def _device_inputs_wanted(self) -> bool:
        """Triton's FORCE_CPU_ONLY_INPUT_TENSORS parameter: "no" lets GPU inputs through."""
        param = self._spec.config.parameters.get("FORCE_CPU_ONLY_INPUT_TENSORS")
        return param is not None and param.string_value.strip().lower() in ("no", "false", "0", "off")

    def _to_pb_request(self, req: WorkRequest) -> Any:
        pb = self._pb
        tensors: list[Any] = []
        for name, arr in req.inputs.items():
            code = self._bytes_code if arr.dtype.kind == "O" else pb.numpy_to_triton_type(arr.dtype)
            tensors.append(pb.Tensor._wrap(name, arr, code))
        params = req.parameters  # JSON text as it came (the router's or a frontend's), or a dict
        if not isinstance(params, str):  # mostly an empty dict (no parameters): no json.dumps for it
            params = json.dumps(params) if params else ""
        pb_req = pb.InferenceRequest._received(
            self._spec.name,
            self._spec.version,
            tensors,
            list(req.requested_outputs or self._output_names),
            req.request_id,
            req.correlation_id,
            req.flags,
            params or "{}",
            pb.InferenceTrace(req.trace_id) if req.trace_id else self._no_trace,
        )
        pb_req._cancelled = req.cancelled
        if self._decoupled and req.send is not None:
            send = req.send
            convert = self._to_work_response
            wanted = frozenset(req.requested_outputs)

            def forward(resp: Any, final: bool) -> None:
                send(None if resp is None else convert(resp, req, wanted), final)

            pb_req._send = forward
        return pb_req

    def _to_work_response(self, resp: Any, req: WorkRequest, wanted: frozenset[str] | None = None) -> WorkResponse:
        """``wanted``: the request's requested outputs (empty: all), when the caller has them."""
        pb = self._pb
        name = self._spec.name
        if resp.__class__ is pb.InferenceResponse:  # no methods a subclass may override
            params, err = resp._parameters, resp._error
        elif isinstance(resp, pb.InferenceResponse):
            params, err = resp.parameters(), resp.error() if resp.has_error() else None
        else:
            return WorkResponse(
                error=ServingError(
                    f"model '{name}': execute returned {type(resp).__name__} instead of an InferenceResponse",
                    code=ErrorCode.INTERNAL,
                )
            )
        if params == "{}":
            params = ""
        if err is not None:
            code = _ERROR_CODES.get(err.code(), ErrorCode.INTERNAL)
            return WorkResponse(error=ServingError(err.message(), code=code), parameters=params)
        if wanted is None:
            wanted = frozenset(req.requested_outputs)
        tensor_cls = pb.Tensor
        outputs: dict[str, Array] = {}
        for tensor in resp.output_tensors():
            if tensor.__class__ is tensor_cls:  # the common case: no methods a subclass may override
                out_name, array = tensor._name, tensor._array
                if wanted and out_name not in wanted:
                    continue
                # a CuPy array stays as it is (the worker copies it out)
                outputs[out_name] = _own(array) if isinstance(array, np.ndarray) else array
                continue
            if not isinstance(tensor, tensor_cls):
                return WorkResponse(
                    error=ServingError(
                        f"model '{name}': an output is a {type(tensor).__name__}, not a pb_utils.Tensor",
                        code=ErrorCode.INTERNAL,
                    )
                )
            if wanted and tensor.name() not in wanted:
                continue
            if not tensor.is_cpu():
                outputs[tensor.name()] = tensor._array  # a CuPy array; the worker copies it out
                continue
            outputs[tensor.name()] = _own(tensor.as_numpy())
        return WorkResponse(outputs=outputs, parameters=params)

    def close(self) -> None:
        """Call the model's ``finalize`` (errors are logged) and forget the module; idempotent."""
        if self._closed:
            return
        self._closed = True
        fin = getattr(self._model, "finalize", None)
        if fin is not None:
            try:
                fin()
            except Exception:  # noqa: BLE001 - a model's finalize must not stop the shutdown
                _LOG.error("model '%s': finalize raised", self._spec.name, exc_info=True)
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        sys.modules.pop(self._module.__name__, None)
        if self._added_path is not None and self._added_path in sys.path:
            sys.path.remove(self._added_path)
        self._model = None


_TRITON_CODES: Final = {v: k for k, v in _ERROR_CODES.items()}


def _gpu_outputs(pb: ModuleType, request: Any) -> bool:
    """``preferred_memory=PreferredMemory(TRITONSERVER_MEMORY_GPU)``: outputs a GPU model
    leaves on the device come back in GPU memory (Triton's default is the producer's memory;
    Shoal's is host memory, so that ``as_numpy()`` works, unless the call asks)."""
    preferred = getattr(request, "_preferred_memory", None)
    return preferred is not None and preferred.preferred_memory_type == pb.TRITONSERVER_MEMORY_GPU


def _bls_exec(pb: ModuleType, client: Any, request: Any, decoupled: bool) -> Any:
    """``InferenceRequest.exec``: the request through the router to its model; failures are
    responses with an error (the calling model decides), never exceptions."""
    inputs = []
    for t in request.inputs():
        if not isinstance(t, pb.Tensor):
            raise pb.TritonModelException(f"BLS inputs must be pb_utils.Tensor, not {type(t).__name__}")
        inputs.append((t.name(), t._array))
    sent: list[int] = []
    replies = client.call(
        request.model_name(),
        int(request.model_version()),
        inputs,
        list(request.requested_output_names()),
        parameters_json=request.parameters(),
        request_id=request.request_id(),
        correlation_id=request.correlation_id(),
        flags=request.flags(),
        timeout_us=request.timeout(),
        decoupled=decoupled,
        trace_id=request.trace()._id,
        on_call=sent.append,
        gpu_outputs=_gpu_outputs(pb, request),
    )

    def response(reply: Any) -> Any:
        outputs, error, params, _final = reply
        if error is not None:
            code = _TRITON_CODES.get(error.code, pb.TritonError.INTERNAL)
            return pb.InferenceResponse(error=pb.TritonError(error.message, code), parameters=params or None)
        tensors = [pb.Tensor(name, array) for name, array in (outputs or {}).items()]
        return pb.InferenceResponse(output_tensors=tensors, parameters=params or None)

    if decoupled:
        return pb.ResponseIterator((response(r) for r in replies), lambda: [client.cancel(c) for c in sent])
    got = [response(r) for r in replies]
    data = [r for r in got if r.has_error() or r.output_tensors()]
    if len(data) > 1:
        return pb.InferenceResponse(
            error=pb.TritonError(
                f"model '{request.model_name()}' sent {len(data)} responses: call exec(decoupled=True)",
                pb.TritonError.INVALID_ARG,
            )
        )
    return data[0] if data else got[-1]


def _import_file(module_name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import '{os.path.basename(path)}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # No __pycache__ in the model repository (it may be read-only, or polled for changes).
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def _own(array: Array) -> Array:
    """An output array as the worker writes it: BYTES as object arrays of ``bytes``. An
    output that is (a view of) an input needs no copy: inputs stay valid until the worker
    has written the outputs (``WorkRequest``)."""
    kind = array.dtype.kind
    if kind in ("S", "U"):
        return _to_object_bytes(array)
    if kind == "O" and not all(isinstance(x, bytes) for x in array.flat):
        return _to_object_bytes(array)
    return array


def _to_object_bytes(array: Array) -> Array:
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, x in enumerate(array.flat):
        flat[i] = x if isinstance(x, bytes) else (x.encode("utf-8") if isinstance(x, str) else str(x).encode("utf-8"))
    return out
