"""The HTTP status of every ``ErrorCode``: the one table for this transport.

Triton's codes map as Triton maps them (``server/src/http_server.cc`` ``HttpCodeFromError``:
whatever has no HTTP counterpart is 400); the codes Triton does not have (RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, PERMISSION_DENIED, FAILED_PRECONDITION: Shoal's own limits and checks)
keep their HTTP meaning."""

from __future__ import annotations

from types import MappingProxyType

from shoal.proto.errors import ErrorCode

HTTP_STATUS = MappingProxyType(
    {
        ErrorCode.UNKNOWN: 400,
        ErrorCode.INVALID_ARGUMENT: 400,
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.ALREADY_EXISTS: 400,
        ErrorCode.FAILED_PRECONDITION: 400,
        ErrorCode.RESOURCE_EXHAUSTED: 429,
        ErrorCode.UNAVAILABLE: 503,
        ErrorCode.DEADLINE_EXCEEDED: 504,
        ErrorCode.CANCELLED: 400,
        ErrorCode.UNIMPLEMENTED: 501,
        ErrorCode.INTERNAL: 500,
        ErrorCode.PERMISSION_DENIED: 403,
    }
)
