"""Triton's wording and status for every client-visible error that Triton also has: the one
table. Clients and Triton's own examples match these texts (``assertIn``, ``startswith``),
so each entry is copied from Triton's source (``source`` names the file: ``core/`` is
triton-inference-server/core, ``server/`` is triton-inference-server/server) and a test
checks each one end to end over HTTP and gRPC (``tests/e2e/test_error_texts.py``).

Raise an entry with its fields: ``raise T.UNKNOWN_MODEL(model=name)``. Entries whose
Triton text starts with the request id (``InferenceRequest::LogRequest()``: every check
of ``InferenceRequest::Normalize`` and the queue) take ``request_id`` (the request's ``id``,
``""`` when it has none, shown as ``<id_unknown>``) and start with ``[request id: ...] ``.

The code is Triton's code (but ``triton_code``: Shoal answers no client's mistake with a
5xx), which each frontend maps to its status as Triton does (HTTP:
``server/src/http_server.cc`` ``HttpCodeFromError``: INVALID_ARG, ALREADY_EXISTS, UNKNOWN
and CANCELLED 400, NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501, INTERNAL 500; gRPC:
``server/src/grpc/grpc_utils.cc``, the same-named status). Errors Triton does not have
keep Shoal's own texts where they are raised, and so do errors about shared-memory keys
(Triton's quote the key; no error here does).

Some texts copy Triton's quirks on purpose: the input-count message ends its empty
missing-input list as ``]`` (no ``[``), a shape mismatch of a non-batching model ends with
``". "``, a failed load ends with a newline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shoal.proto.errors import (
    DeadlineExceeded,
    ErrorCode,
    InvalidInput,
    QueueFull,
    ServingError,
    Unsupported,
)

ID_UNKNOWN = "<id_unknown>"
"""What Triton shows for a request without an id."""
INVALID_DATATYPE = "<invalid>"
"""How Triton names a datatype string it does not know."""


@dataclass(frozen=True, slots=True)
class ErrorText:
    code: ErrorCode
    template: str
    """``str.format`` fields; with ``request_prefix`` the text follows ``[request id: X] ``."""
    source: str
    """Where Triton raises it."""
    request_prefix: bool = False
    kind: type[ServingError] | None = None
    """The exception class (``None``: ``InvalidInput`` for INVALID_ARGUMENT, else ``ServingError``)."""
    triton_code: ErrorCode | None = None
    """Triton's code where it differs from ``code``: Triton answers a few clients' mistakes
    with INTERNAL (HTTP 500); Shoal never answers a client's mistake with a 5xx, so those
    keep Triton's text with INVALID_ARGUMENT (400)."""

    def text(self, request_id: str | None = None, **fields: Any) -> str:
        body = self.template.format(**fields)
        if self.request_prefix:
            return f"[request id: {request_id or ID_UNKNOWN}] {body}"
        return body

    def __call__(self, request_id: str | None = None, **fields: Any) -> ServingError:
        kind = self.kind or (InvalidInput if self.code is ErrorCode.INVALID_ARGUMENT else ServingError)
        return kind(self.text(request_id, **fields), code=self.code)


def dims(shape: Sequence[int]) -> str:
    """A shape as Triton writes it (``DimsListToString``): ``[-1,16]``."""
    return "[" + ",".join(str(d) for d in shape) + "]"


_INVALID = ErrorCode.INVALID_ARGUMENT
_CORE_REQ = "core/src/infer_request.cc"
_CORE_REPO = "core/src/model_repository_manager/model_repository_manager.cc"
_HTTP = "server/src/http_server.cc"
_GRPC = "server/src/grpc/infer_handler.cc"
_GRPC_SERVER = "server/src/grpc/grpc_server.cc"
_SHM = "server/src/shared_memory_manager.cc"
_SEQ = "core/src/sequence_batch_scheduler/sequence_batch_scheduler.cc"

# ---- model lookup (every request naming a model) ------------------------------------------

UNKNOWN_MODEL = ErrorText(_INVALID, "Request for unknown model: '{model}' is not found", _CORE_REPO)
UNKNOWN_VERSION = ErrorText(
    ErrorCode.NOT_FOUND,
    "Request for unknown model: '{model}' version {version} is not found",
    "core/src/model_repository_manager/model_lifecycle.cc",
)
NO_AVAILABLE_VERSIONS = ErrorText(
    ErrorCode.NOT_FOUND,
    "Request for unknown model: '{model}' has no available versions",
    "core/src/model_repository_manager/model_lifecycle.cc",
)
VERSION_NOT_READY = ErrorText(
    ErrorCode.UNAVAILABLE,
    "Request for unknown model: '{model}' version {version} is not at ready state",
    "core/src/model_repository_manager/model_lifecycle.cc",
)
STATS_MODEL_UNAVAILABLE = ErrorText(_INVALID, "requested model '{model}' is not available", "core/src/tritonserver.cc")
STATS_VERSION_UNAVAILABLE = ErrorText(
    _INVALID, "requested model version is not available for model '{model}'", "core/src/tritonserver.cc"
)

VERSION_PARSE = ErrorText(
    _INVALID,
    "failed to get model version from specified version string '{version}' (details: stol), version should be "
    "an integral value > 0",
    "server/src/common.cc",
)
VERSION_NEGATIVE = ErrorText(
    _INVALID,
    "invalid model version specified '{version}' , version should be an integral value > 0",
    "server/src/common.cc",
)

# ---- model repository extension -----------------------------------------------------------

CONTROL_DISABLED = ErrorText(
    ErrorCode.UNAVAILABLE, "explicit model load / unload is not allowed if polling is enabled", _CORE_REPO
)
LOAD_POLL_FAILED = ErrorText(
    _INVALID,
    "failed to load '{model}', failed to poll from model repository",
    _CORE_REPO,
    triton_code=ErrorCode.INTERNAL,
)
"""Not in the repository, or its directory / configuration cannot be read (the log says why)."""
LOAD_FAILED = ErrorText(_INVALID, "load failed for model '{model}': {reasons}\n", _CORE_REPO)
"""``reasons``: ``LOAD_VERSION_FAILED`` of each version that failed, joined without separator."""
LOAD_VERSION_FAILED = ErrorText(
    _INVALID,
    "version {version} is at UNAVAILABLE state: {reason};",
    "core/src/model_repository_manager/model_lifecycle.cc",
)
MODEL_NAME_EMPTY = ErrorText(_INVALID, "Model name cannot be empty. Please enter a valid name to deploy.", _CORE_REPO)
MODEL_NAME_TRAVERSAL = ErrorText(
    _INVALID, "invalid model name '{model}', model name must not contain path traversal characters", _CORE_REPO
)

# ---- inference request checks (InferenceRequest::Normalize and friends) -------------------

UNEXPECTED_INPUT = ErrorText(_INVALID, "unexpected inference input '{name}' for model '{model}'", "core/src/model.cc")
UNEXPECTED_OUTPUT = ErrorText(_INVALID, "unexpected inference output '{name}' for model '{model}'", "core/src/model.cc")
DUPLICATE_INPUT = ErrorText(_INVALID, "input '{name}' already exists in request", _CORE_REQ, True)
INPUT_COUNT = ErrorText(
    _INVALID,
    "expected {expected} inputs but got {got} inputs for model '{model}'. Got input(s) {given}, but missing "
    "required input(s) {missing}. Please provide all required input(s).",
    _CORE_REQ,
    True,
)
INPUT_COUNT_RANGE = ErrorText(
    _INVALID,
    "expected number of inputs between {required} and {total} but got {got} inputs for model '{model}'. Got "
    "input(s) {given}, but missing required input(s) {missing}. Please provide all required input(s).",
    _CORE_REQ,
    True,
)
NO_BATCH_DIMENSION = ErrorText(
    _INVALID, "input '{name}' has no shape but model requires batch dimension for '{model}'", _CORE_REQ, True
)
BATCH_SIZE_MISMATCH = ErrorText(
    _INVALID, "input '{name}' batch size does not match other inputs for '{model}'", _CORE_REQ, True
)
BATCH_TOO_LARGE = ErrorText(
    _INVALID, "inference request batch-size must be <= {max_batch_size} for '{model}'", _CORE_REQ, True
)
INPUT_DATATYPE = ErrorText(
    _INVALID,
    "inference input '{name}' data-type is '{got}', but model '{model}' expects '{expected}'",
    _CORE_REQ,
    True,
)
WILDCARD_DIMENSION = ErrorText(
    _INVALID,
    "All input dimensions should be specified for input '{name}' for model '{model}', got {shape}",
    _CORE_REQ,
    True,
)
INPUT_SHAPE = ErrorText(
    _INVALID,
    "unexpected shape for input '{name}' for model '{model}'. Expected {expected}, got {shape}. {note}",
    _CORE_REQ,
    True,
)
"""``note``: ``IMPLICIT_BATCH_NOTE`` for a batching model, else empty."""
IMPLICIT_BATCH_NOTE = (
    "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended "
    "to each input shape. If you want to specify the full shape including the batch dim in your input dims "
    "config, try setting max_batch_size to zero. See the model configuration docs for more info on "
    "max_batch_size."
)
INPUT_BYTE_SIZE = ErrorText(
    _INVALID,
    "input byte size mismatch for input '{name}' for model '{model}'. Expected {expected}, got {got}",
    _CORE_REQ,
    True,
)
STRING_COUNT = ErrorText(
    _INVALID,
    "expected {expected} string elements for inference input '{name}' for model '{model}', got {got}",
    _CORE_REQ,
    True,
)
STRING_COUNT_EXCEEDED = ErrorText(
    _INVALID,
    "unexpected number of string elements {got} for inference input '{name}' for model '{model}', expecting {expected}",
    _CORE_REQ,
    True,
)
RAW_INPUT_COUNT = ErrorText(
    _INVALID,
    "Raw request must only have 1 input (found 1) to be deduced but got {count} inputs in '{model}' model "
    "configuration",
    _CORE_REQ,
    True,
)
RAW_INPUT_BYTES_SHAPE = ErrorText(
    _INVALID, "For BYTE datatype raw input '{name}', the model must have input shape [1]", _CORE_REQ, True
)
RAW_INPUT_VARIABLE_DIMS = ErrorText(
    _INVALID,
    "The shape of the raw input '{name}' can not be deduced because there are more than one variable-sized dimension",
    _CORE_REQ,
    True,
)

# ---- schedulers --------------------------------------------------------------------------

QUEUE_FULL = ErrorText(
    ErrorCode.UNAVAILABLE, "Exceeds maximum queue size", "core/src/scheduler_utils.cc", True, QueueFull
)
QUEUE_TIMEOUT = ErrorText(
    ErrorCode.UNAVAILABLE, "Request timeout expired", "core/src/dynamic_batch_scheduler.cc", kind=DeadlineExceeded
)
SEQUENCE_NO_CORRELATION_ID = ErrorText(
    _INVALID,
    "inference request to model '{model}' must specify a non-zero or non-empty correlation ID",
    "core/src/sequence_batch_scheduler/sequence_utils.h",
)
MODEL_VERSION_NOT_READY = ErrorText(_INVALID, "Model version not ready", _HTTP)
# trace settings (server/src/http_server.cc HandleTrace, server/src/grpc/grpc_server.cc TraceSetting)
TRACE_SETTING_NOT_INTEGER = ErrorText(_INVALID, "Unable to parse '{name}', got: {text}", _GRPC_SERVER)
TRACE_SETTING_OUT_OF_RANGE = ErrorText(
    _INVALID, "Unable to parse '{name}', value is out of range [ {low}, {high} ], got: {text}", _GRPC_SERVER
)
TRACE_SETTING_BELOW = ErrorText(_INVALID, "Unable to parse '{name}'. Expecting value >= {low}, got{sep}{text}", _HTTP)
TRACE_LEVEL_OFF_ALONE = ErrorText(_INVALID, "Expect only one trace level 'OFF' is specified", _HTTP)
TRACE_SETTING_ONE_VALUE = ErrorText(_INVALID, "expect only 1 value for '{name}'", _GRPC_SERVER)
JSON_NOT_ARRAY = ErrorText(
    _INVALID, "attempt to access JSON non-array as array", _HTTP, triton_code=ErrorCode.INTERNAL
)  # TritonJson's text (common/include/triton/common/triton_json.h), INTERNAL in the server's build
JSON_NOT_STRING = ErrorText(
    _INVALID, "attempt to access JSON non-string as string", _HTTP, triton_code=ErrorCode.INTERNAL
)
RESCHEDULE_NOT_CONFIGURED = ErrorText(
    _INVALID,
    "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is not "
    "configured to handle such a flag.",
    "core/src/infer_request.cc",
)
SEQUENCE_NO_START = ErrorText(
    _INVALID,
    "inference request for sequence {sequence_id} to model '{model}' must specify the START flag on the first "
    "request of the sequence",
    _SEQ,
)
SEQUENCE_BATCH_SIZE = ErrorText(
    _INVALID,
    "inference request to model '{model}' must specify batch-size 1 due to requirements of sequence batcher",
    _SEQ,
)
SEQUENCE_ID_DATATYPE = ErrorText(
    _INVALID,
    "sequence batching control '{name}' data-type is '{got}', but model '{model}' expects '{expected}'",
    _CORE_REQ,
    True,
)

# ---- HTTP frontend -----------------------------------------------------------------------

HTTP_DECOUPLED = ErrorText(
    ErrorCode.UNIMPLEMENTED,
    "HTTP end point doesn't support models with decoupled transaction policy",
    _HTTP,
    kind=Unsupported,
)
HTTP_INPUT_FIELDS = ErrorText(
    _INVALID,
    "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
    "'shared_memory_region' in 'parameters'. But{fields}",
    _HTTP,
)
"""``fields``: ``" no field is set"`` or ``" set"`` and each field set (``" 'data'"``, ...)."""
HTTP_INPUT_SHORT = ErrorText(
    _INVALID, "unexpected size for input '{name}', expecting {missing} additional bytes for model '{model}'", _HTTP
)
HTTP_EXTRA_DATA = ErrorText(_INVALID, "unexpected additional input data for model '{model}'", _HTTP)
HTTP_SHAPE = ErrorText(
    _INVALID,
    "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer",
    _HTTP,
    triton_code=ErrorCode.INTERNAL,
)
HTTP_JSON_DATATYPE = ErrorText(_INVALID, "invalid datatype for input {name}", _HTTP)
HTTP_JSON_HALF = ErrorText(
    _INVALID,
    "receiving {datatype} data via JSON is not supported. Please use the binary data format for input {name}",
    _HTTP,
)
HTTP_JSON_TOO_MANY = ErrorText(
    _INVALID,
    "Unable to parse 'data': Shape does not match true shape of 'data' field",
    _HTTP,
    triton_code=ErrorCode.INTERNAL,
)
HTTP_JSON_TOO_FEW = ErrorText(
    _INVALID,
    "Failed to parse 'data' field: shape does not match true shape",
    _HTTP,
    triton_code=ErrorCode.INTERNAL,
)
HTTP_TRITON_PARAMETER = ErrorText(
    _INVALID, "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified.", _HTTP
)
OUTPUT_SHM_CLASSIFICATION = ErrorText(
    _INVALID, "Output can't set both 'shared_memory_region' and 'classification'", _HTTP
)
HTTP_SHM_NO_KEY = ErrorText(_INVALID, "Shared memory register request has no 'key' field", _HTTP)
HTTP_SHM_NO_BYTE_SIZE = ErrorText(_INVALID, "Shared memory register request has no 'byte_size' field", _HTTP)
HTTP_SHM_NO_RAW_HANDLE = ErrorText(_INVALID, "Shared memory register request has no 'raw_handle' field", _HTTP)

# ---- gRPC frontend -----------------------------------------------------------------------

GRPC_DECOUPLED = ErrorText(
    ErrorCode.UNIMPLEMENTED,
    "ModelInfer RPC doesn't support models with decoupled transaction policy",
    _GRPC,
    kind=Unsupported,
)
GRPC_CONTENTS_WITH_RAW = ErrorText(
    _INVALID,
    "contents field must not be specified when using raw_input_contents for '{name}' for model '{model}'",
    _GRPC,
)
GRPC_CONTENTS_WITH_SHM = ErrorText(
    _INVALID,
    "unexpected 'content' provided when using shared memory for input tensor '{name}' for model '{model}'",
    _GRPC,
)
GRPC_NO_DATA = ErrorText(
    _INVALID, "unable to find data for input tensor '{name}' for model '{model}' in request.", _GRPC
)
GRPC_CONTENTS_DATATYPE = ErrorText(
    _INVALID,
    "unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type '{got}', expected "
    "datatype '{expected}'",
    _GRPC,
)
GRPC_CONTENTS_TWICE = ErrorText(
    _INVALID,
    "unexpected explicit tensor data for input tensor '{name}' for model '{model}', binary data was already supplied.",
    _GRPC,
)
GRPC_TRITON_PARAMETER = ErrorText(
    _INVALID,
    "parameter keys starting with 'triton_' are reserved for Triton usage. Only the following keys starting "
    "with 'triton_' are allowed: {allowed}",
    _GRPC,
)

# ---- shared-memory extensions ------------------------------------------------------------

SHM_DISABLED = ErrorText(
    ErrorCode.UNIMPLEMENTED,
    "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable.",
    "server/src/common.h",
    kind=Unsupported,
)
SHM_NOT_FOUND = ErrorText(ErrorCode.NOT_FOUND, "Unable to find shared memory region: '{region}'", _SHM)
SHM_BAD_OFFSET = ErrorText(_INVALID, "Invalid offset for shared memory region: '{region}'", _SHM)
SHM_BAD_RANGE = ErrorText(_INVALID, "Invalid offset + byte size for shared memory region: '{region}'", _SHM)
SHM_OUTPUT_TOO_SMALL = ErrorText(
    _INVALID,
    "shared memory size specified with the request for output '{name}' ({size} bytes) should be at least "
    "{needed} bytes to hold the results",
    _GRPC + " and " + _HTTP,
    triton_code=ErrorCode.INTERNAL,
)
SHM_STATUS_UNKNOWN = ErrorText(ErrorCode.NOT_FOUND, "Unable to find {kind} shared memory region: '{region}'", _SHM)
"""``kind``: ``system`` or ``cuda``."""
SHM_WRONG_KIND = ErrorText(
    ErrorCode.NOT_FOUND,
    "The region named '{region}' is registered as {is_kind} shared memory, not {asked} shared memory",
    _SHM,
)
"""``is_kind`` / ``asked``: ``CUDA`` or ``system``."""
SHM_EXISTS = ErrorText(ErrorCode.ALREADY_EXISTS, "shared memory region '{region}' already in manager", _SHM)
SHM_INVALID_ARGS = ErrorText(_INVALID, "failed to register shared memory region '{region}': invalid args", _SHM)
"""Every key that cannot be used (missing, not the client's, smaller than offset + byte_size):
one text, so that clients learn nothing about keys they may not use."""
SHM_CUDA_OPEN = ErrorText(_INVALID, "failed to register shared memory region: invalid args", _SHM)
"""A CUDA IPC handle that does not open (Triton opens it at registration, as Shoal's worker does)."""
SHM_CUDA_NO_GPUS = ErrorText(
    _INVALID, "failed to register CUDA shared memory region: '{region}', GPUs not supported", _HTTP
)
SHM_CUDA_HANDLE = ErrorText(_INVALID, "'raw_handle' must be a valid base64 encoded cudaIpcMemHandle_t", _HTTP)

# ---- load requests with parameters (config override, model files) --------------------------

LOAD_CONFIG_NOT_STRING = ErrorText(
    _INVALID, "Config parameter 'config' must have string type for its value", _CORE_REPO
)
LOAD_CONFIG_INVALID = ErrorText(
    _INVALID,
    "failed to load '{model}', failed to poll from model repository: Invalid config override: {detail}",
    _CORE_REPO,
)
"""Triton logs the override's problem and answers the poll failure; here the client gets both."""
LOAD_PARAM_UNRECOGNIZED = ErrorText(_INVALID, "Unrecognized load parameter '{name}' with type '{type}'", _CORE_REPO)
LOAD_FILES_NEED_CONFIG = ErrorText(
    _INVALID, "Load parameter 'config' must be specified for model file override", _CORE_REPO
)
LOAD_FILE_NOT_BYTES = ErrorText(_INVALID, "File parameter '{name}' must have bytes type for its value", _CORE_REPO)
LOAD_FILE_ESCAPES = ErrorText(_INVALID, "Invalid file parameter '{name}' must stay within model directory.", _CORE_REPO)
"""Triton also shows the normalized host path; Shoal never shows a host path."""
TRACE_UNKNOWN_MODEL = ErrorText(_INVALID, "Request for unknown model : {model}", _HTTP)

# ---- model configuration features (checked at load) --------------------------------------

_CONFIG_UTILS = "core/src/model_config_utils.cc"
CACHE_WITH_SEQUENCE = ErrorText(
    _INVALID,
    "Response Cache does not currently support model {model} with sequence batching scheduler. "
    "Please disable the response cache.",
    _CONFIG_UTILS,
)
CACHE_WITH_DECOUPLED = ErrorText(
    _INVALID,
    "Response Cache does not currently support model {model} with 'decoupled' transaction policy. "
    "Please disable the response cache.",
    _CONFIG_UTILS,
)
BATCH_IO_SOURCES = ErrorText(_INVALID, "batch {what} kind '{kind}' expects 1 source input, got {count}", _CONFIG_UTILS)
"""``what``: ``input`` or ``output``."""
BATCH_INPUT_DATATYPE = ErrorText(_INVALID, "batch input data type must be TYPE_INT32 or TYPE_FP32", _CONFIG_UTILS)
BATCH_IO_UNKNOWN_SOURCE = ErrorText(_INVALID, "unknown source input name '{name}'", _CONFIG_UTILS)
RATE_LIMIT_TOO_FEW = ErrorText(
    _INVALID,
    'Resource count for "{name}" is limited to {limit} which will prevent scheduling of one or more model '
    "instances, the minimum required count is {need}",
    "core/src/rate_limiter.cc",
)
_WARMUP = "core/src/backend_model_instance.cc"
WARMUP_VARIABLE_DIMS = ErrorText(
    _INVALID, "warmup setting expects all variable-size dimensions are specified for input '{name}'", _WARMUP
)
WARMUP_NO_DATA = ErrorText(_INVALID, "warmup setting expects input '{name}' to have input_data_type set", _WARMUP)
WARMUP_FILE_SHORT = ErrorText(
    _INVALID,
    "warmup setting expects {need} bytes, but the data provided from {file} only has {have} bytes",
    _WARMUP,
)
WARMUP_SAMPLE_FAILED = ErrorText(_INVALID, "failed to run warmup sample '{name}': {errors}", _WARMUP)


TABLE: Mapping[str, ErrorText] = MappingProxyType(
    {name: value for name, value in sorted(globals().items()) if isinstance(value, ErrorText)}
)
"""Every entry by name (the tests walk it)."""
