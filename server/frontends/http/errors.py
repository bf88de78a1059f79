"""The HTTP status of every ``ErrorCode``: the one table for this transport."""

from __future__ import annotations

from types import MappingProxyType

from shoal.proto.errors import ErrorCode

HTTP_STATUS = MappingProxyType(
    {
        ErrorCode.UNKNOWN: 500,
        ErrorCode.INVALID_ARGUMENT: 400,
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.ALREADY_EXISTS: 409,
        ErrorCode.FAILED_PRECONDITION: 400,
        ErrorCode.RESOURCE_EXHAUSTED: 429,
        ErrorCode.UNAVAILABLE: 503,
        ErrorCode.DEADLINE_EXCEEDED: 504,
        ErrorCode.CANCELLED: 499,
        ErrorCode.UNIMPLEMENTED: 501,
        ErrorCode.INTERNAL: 500,
        ErrorCode.PERMISSION_DENIED: 403,
    }
)
