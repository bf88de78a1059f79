"""Shoal's implementation of Triton's ``triton_python_backend_utils`` module.

Imported by Python-backend models as ``import triton_python_backend_utils as pb_utils``; the
worker puts this directory on ``sys.path``. It depends on numpy only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any, ClassVar, Final

from _shoal_pb_config import ModelConfig
from _shoal_pb_memory import (
    TRITONSERVER_MEMORY_CPU,
    TRITONSERVER_MEMORY_CPU_PINNED,
    TRITONSERVER_MEMORY_GPU,
    MemoryType,
    PreferredMemory,
)
from _shoal_pb_metrics import Metric, MetricFamily, MetricKind
from _shoal_pb_metrics import _set_metrics as _set_metrics  # for the worker
from _shoal_pb_tensor import (
    TRITON_STRING_TO_NUMPY,
    Tensor,
    TritonModelException,
    deserialize_bytes_tensor,
    numpy_to_triton_type,
    serialize_byte_tensor,
    triton_string_to_numpy,
    triton_to_numpy_type,
)

__all__ = [
    "TRITONSERVER_MEMORY_CPU",
    "TRITONSERVER_MEMORY_CPU_PINNED",
    "TRITONSERVER_MEMORY_GPU",
    "TRITON_STRING_TO_NUMPY",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceResponseSender",
    "InferenceTrace",
    "LogLevel",
    "Logger",
    "MemoryType",
    "Metric",
    "MetricFamily",
    "MetricKind",
    "PreferredMemory",
    "ModelConfig",
    "ResponseIterator",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "deserialize_bytes_tensor",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "is_model_ready",
    "load_model",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "unload_model",
    "using_decoupled_model_transaction_policy",
]

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START: Final = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END: Final = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL: Final = 1
TRITONSERVER_REQUEST_RELEASE_ALL: Final = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE: Final = 2


class TritonError(Exception):
    """An error status a model attaches to an ``InferenceResponse`` (or raises)."""

    UNKNOWN: ClassVar[int] = 0
    INTERNAL: ClassVar[int] = 1
    NOT_FOUND: ClassVar[int] = 2
    INVALID_ARG: ClassVar[int] = 3
    UNAVAILABLE: ClassVar[int] = 4
    UNSUPPORTED: ClassVar[int] = 5
    ALREADY_EXISTS: ClassVar[int] = 6
    CANCELLED: ClassVar[int] = 7

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self._message = message
        self._code = int(code)

    def __str__(self) -> str:
        return self._message

    def message(self) -> str:
        """The error message."""
        return self._message

    def code(self) -> int:
        """One of the code constants of this class."""
        return self._code


class ResponseIterator:
    """The responses of a decoupled model to a BLS call (``exec(decoupled=True)``), as they
    come; ``cancel()`` stops the call: the target model sees ``request.is_cancelled()`` and
    no more responses are delivered here."""

    def __init__(self, responses: Any, cancel: Any = None) -> None:
        self._responses = responses
        self._cancel = cancel
        self._ahead: list[Any] = []

    def __iter__(self) -> ResponseIterator:
        return self

    def __next__(self) -> Any:
        if self._ahead:
            return self._ahead.pop()
        return next(self._responses)

    def _first(self) -> None:
        """Wait for the first response (the call is sent by then; ``async_exec``)."""
        try:
            self._ahead.append(next(self._responses))
        except StopIteration:
            pass

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()
            self._cancel = None
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()  # a generator: the call's ``finally`` forgets it here


_CONTROL: list[Any] = [None]
"""The worker's client for model management (``workers.bls.BlsClient``)."""
_BLS: list[Any] = [None]
"""The worker's BLS entry point: ``call(request, decoupled)`` (set by the Python backend)."""


def _set_bls(call: Any, client: Any = None) -> None:
    _BLS[0] = call
    _CONTROL[0] = client


def _not_supported(what: str) -> TritonModelException:
    return TritonModelException(f"{what} is not supported yet by Shoal's Python backend")


def _params_json(parameters: Mapping[str, Any] | str | None) -> str:
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        json.loads(parameters)
        return parameters
    return json.dumps(dict(parameters))


class InferenceTrace:
    """A request's trace (``request.trace()``): pass it to a BLS request,
    ``InferenceRequest(..., trace=request.trace())``, and the call is traced under the
    request's trace (Triton's ``parent_id``). An untraced request's trace is empty."""

    def __init__(self, trace_id: int = 0, context: str | None = None) -> None:
        self._id = int(trace_id)
        self._context = context

    def get_context(self, mode: str = "opentelemetry") -> str | None:
        """The trace context Triton's OpenTelemetry mode propagates; none here."""
        return self._context


class InferenceRequest:
    """An inference request: given to ``execute``, or built by the model for a BLS call (``exec``)."""

    def __init__(
        self,
        model_name: str = "",
        inputs: Sequence[Tensor] | None = None,
        requested_output_names: Sequence[str] | None = None,
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        parameters: Mapping[str, Any] | str | None = None,
        trace: InferenceTrace | None = None,
        preferred_memory: PreferredMemory | None = None,
        **_ignored: Any,
    ) -> None:
        self._set(
            model_name,
            model_version,
            list(inputs or []),
            list(requested_output_names or []),
            request_id,
            correlation_id,
            flags,
            _params_json(parameters),
            trace if trace is not None else InferenceTrace(),
            timeout,
            preferred_memory,
        )

    @classmethod
    def _received(cls, *fields: Any) -> InferenceRequest:
        """(the worker) A request as ``execute`` gets it, from ``_set``'s arguments, already
        what they must be: no copies, no JSON check (``__init__``'s conversions)."""
        self = cls.__new__(cls)
        self._set(*fields)
        return self

    def _set(
        self,
        model_name: str,
        model_version: int,
        inputs: list[Tensor],
        requested: list[str],
        request_id: str,
        correlation_id: int | str,
        flags: int,
        parameters_json: str,
        trace: InferenceTrace,
        timeout: int = 0,
        preferred_memory: PreferredMemory | None = None,
    ) -> None:
        self._trace = trace
        self._preferred_memory = preferred_memory
        self._model_name = model_name
        self._model_version = model_version
        self._inputs = inputs
        self._requested = requested
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters_json
        self._send: Any = None
        """Set by the worker for a decoupled model's requests: ``send(response, final)``."""
        self._cancelled: Any = None
        """Set by the worker: ``cancelled()`` reports the client's cancellation."""
        self._sender: InferenceResponseSender | None = None
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    def inputs(self) -> list[Tensor]:
        """The input tensors."""
        return self._inputs

    def requested_output_names(self) -> list[str]:
        """The names of the outputs to compute."""
        return self._requested

    def request_id(self) -> str:
        """The client's request id, or ``""``."""
        return self._request_id

    def correlation_id(self) -> int | str:
        """The sequence correlation id (int or string), or 0."""
        return self._correlation_id

    def flags(self) -> int:
        """Sequence flags: ``TRITONSERVER_REQUEST_FLAG_SEQUENCE_START``/``_END``."""
        return self._flags

    def set_flags(self, flags: int) -> None:
        """The request's flags (``TRITONSERVER_REQUEST_FLAG_SEQUENCE_*``) for a BLS call."""
        self._flags = int(flags)

    def timeout(self) -> int:
        """The request timeout in microseconds (0: none)."""
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON string."""
        return self._parameters

    def model_name(self) -> str:
        """The name of the model the request is for."""
        return self._model_name

    def trace(self) -> InferenceTrace:
        """The request's trace (for ``InferenceRequest(trace=...)`` of a BLS call)."""
        return self._trace

    def model_version(self) -> int:
        """The version of the model the request is for (-1: unspecified)."""
        return self._model_version

    def is_cancelled(self) -> bool:
        """Whether the client went away (gRPC cancel, HTTP disconnect) or the request's
        deadline passed: the model may stop working on it."""
        return bool(self._cancelled is not None and self._cancelled())

    def get_response_sender(self) -> InferenceResponseSender:
        """The sender of this request's responses (decoupled models only)."""
        if self._send is None:
            raise TritonModelException(
                "Unable to get response sender: the model is not using the decoupled transaction policy"
            )
        if self._sender is None:
            self._sender = InferenceResponseSender(self._send, self._cancelled)
        return self._sender

    def set_release_flags(self, flags: int) -> None:
        """``TRITONSERVER_REQUEST_RELEASE_RESCHEDULE``: run this request again in a later batch
        (a model with ``sequence_batching { iterative_sequence: true }``; the response for it
        in ``execute``'s list is ``None``); ``TRITONSERVER_REQUEST_RELEASE_ALL``: the default."""
        self._release_flags = int(flags)

    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on ``model_name`` (BLS): its ``InferenceResponse`` (check
        ``has_error()``), or with ``decoupled=True`` an iterator of the responses of a
        decoupled model (the last may be empty: it only ends the stream)."""
        call = _BLS[0]
        if call is None:
            raise TritonModelException("BLS requests can only be made from a model running in a Shoal worker")
        return call(self, decoupled)

    async def async_exec(self, decoupled: bool = False) -> Any:
        """``exec`` without blocking the model's event loop (several may run at once)."""
        loop = asyncio.get_running_loop()
        if decoupled:
            # as python_backend: a ResponseIterator (with cancel()) once the call is under way;
            # its later responses are read as the model iterates, not all collected first
            responses = self.exec(decoupled=True)
            await loop.run_in_executor(None, responses._first)
            return responses
        return await loop.run_in_executor(None, self.exec)


class InferenceResponse:
    """The response a model returns for one request: output tensors or an error."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | str | None = None,
    ) -> None:
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, (list, tuple)):
            raise TritonModelException('"output_tensors" must be a list')
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException('"error" must be a TritonError')
        self._outputs = list(output_tensors)
        self._error = error
        self._parameters = _params_json(parameters)

    def output_tensors(self) -> list[Tensor]:
        """The output tensors."""
        return self._outputs

    def has_error(self) -> bool:
        """Whether the response carries an error."""
        return self._error is not None

    def error(self) -> TritonError | None:
        """The response's error, or None."""
        return self._error

    def parameters(self) -> str:
        """The response's parameters as a JSON string."""
        return self._parameters


class InferenceResponseSender:
    """Sends a decoupled model's responses to one request: any number of ``send(response)``
    calls, from ``execute`` or any thread, the last with ``flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL``
    (with a response, or ``None`` to only close the stream)."""

    def __init__(self, send: Any, cancelled: Any = None) -> None:
        self._send = send
        self._cancelled = cancelled
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        """Send ``response`` (``None``: none, only the flags); FINAL closes the sender."""
        final = bool(int(flags) & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException("Inference Response object must be provided when the response flags is 0.")
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"response must be an InferenceResponse, not {type(response).__name__}")
        with self._lock:
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if final:
                self._closed = True
        self._send(response, final)

    def is_cancelled(self) -> bool:
        """Whether the client went away: further responses would reach nobody."""
        return bool(self._cancelled is not None and self._cancelled())


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input tensor called ``name``, or None."""
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    """The response's output tensor called ``name``, or None."""
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def _config_by_name(model_config: Mapping[str, Any], key: str, name: str) -> dict[str, Any] | None:
    for entry in model_config.get(key, []):
        if entry.get("name") == name:
            return dict(entry) if not isinstance(entry, dict) else entry
    return None


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The ``input`` entry called ``name`` of a model config dict, or None."""
    return _config_by_name(model_config, "input", name)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The ``output`` entry called ``name`` of a model config dict, or None."""
    return _config_by_name(model_config, "output", name)


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    """Whether a model config dict asks for the decoupled transaction policy."""
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


def _control(action: int, model_name: str, **kw: Any) -> bool:
    client = _CONTROL[0]
    if client is None:
        raise TritonModelException("model management is only available to a model running in a Shoal worker")
    ok, error = client.control(action, model_name, **kw)
    if error:
        raise TritonModelException(error)
    return bool(ok)


def load_model(model_name: str, config: str = "", files: Mapping[str, bytes] | None = None) -> None:
    """Load or reload ``model_name`` (the server must use explicit model control); ``config``:
    JSON of a configuration to use instead of its config.pbtxt; ``files``: model files
    ("file:<path in the model directory>": contents; ``config`` is then needed), which the
    server loads from a directory of their own. Raises on failure."""
    _control(0, model_name, config_json=config or "", files=dict(files or {}))


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    """Unload ``model_name`` (explicit model control); raises on failure."""
    _control(1, model_name, dependents=bool(unload_dependents))


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    """Whether ``model_name`` (a version, or the one the version policy picks) is ready."""
    version = int(model_version) if str(model_version).strip() else -1
    return _control(2, model_name, version=version)


class LogLevel(IntEnum):
    """Log levels of ``Logger.log``."""

    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


_LOG: Final = logging.getLogger("shoal.python_model")
_LEVELS: Final = {
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.VERBOSE: logging.DEBUG,
}


class Logger:
    """Model logging into the worker's log (stderr) through the ``logging`` module."""

    INFO: ClassVar[LogLevel] = LogLevel.INFO
    WARNING: ClassVar[LogLevel] = LogLevel.WARNING
    ERROR: ClassVar[LogLevel] = LogLevel.ERROR
    VERBOSE: ClassVar[LogLevel] = LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        """Log ``message`` at ``level`` (a ``LogLevel``)."""
        _LOG.log(_LEVELS.get(LogLevel(int(level)), logging.INFO), "%s", message, stacklevel=2)

    @staticmethod
    def log_info(message: str) -> None:
        """Log at INFO level."""
        _LOG.info("%s", message, stacklevel=2)

    @staticmethod
    def log_warn(message: str) -> None:
        """Log at WARNING level."""
        _LOG.warning("%s", message, stacklevel=2)

    @staticmethod
    def log_error(message: str) -> None:
        """Log at ERROR level."""
        _LOG.error("%s", message, stacklevel=2)

    @staticmethod
    def log_verbose(message: str) -> None:
        """Log at VERBOSE (``logging.DEBUG``) level."""
        _LOG.debug("%s", message, stacklevel=2)
