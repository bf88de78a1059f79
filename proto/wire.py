"""Encode and decode router <-> worker messages: ``[header, *buffers]`` multipart frames.

``header`` is a serialized ``shoal.worker.Envelope``; ``buffers`` are inline tensor bytes
referenced by ``TensorRef.frame``. Nothing is pickled.
"""

from __future__ import annotations

from typing import Final

from shoal.proto.errors import BackendError, ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb

PROTOCOL_VERSION: Final = 1


def envelope(request_id: int = 0) -> wpb.Envelope:
    env = wpb.Envelope()
    env.protocol_version = PROTOCOL_VERSION
    env.request_id = request_id
    return env


def parse(header: bytes | memoryview) -> wpb.Envelope:
    """Decode a header frame; raises ``ServingError(INTERNAL)`` on garbage or a protocol
    version other than ours."""
    env = wpb.Envelope()
    try:
        env.ParseFromString(header)  # type: ignore[arg-type]  # upb accepts any buffer
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError; anything else is as bad
        raise ServingError(
            f"malformed message between the server and a model instance: {exc}", code=ErrorCode.INTERNAL
        ) from None
    if env.protocol_version != PROTOCOL_VERSION:
        raise ServingError(
            f"worker protocol version {env.protocol_version}, expected {PROTOCOL_VERSION}",
            code=ErrorCode.INTERNAL,
        )
    return env


def failed(err: ServingError, out: wpb.Failed) -> None:
    out.code = wpb.ErrorCode.ValueType(int(err.code))
    out.message = err.message


def to_error(f: wpb.Failed) -> ServingError:
    try:
        code = ErrorCode(f.code)
    except ValueError:
        code = ErrorCode.UNKNOWN
    return BackendError(f.message, code=code)


RESERVED_PARAMETERS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "binary_data_output",
        "triton_enable_empty_final_response",
    }
)
"""Request parameters the router reads itself (sequence batching, priority, deadline,
headers, response options): never passed to a worker."""
