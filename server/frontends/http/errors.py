"""The HTTP status of every ``ErrorCode``: the one table for this transport.

Triton's codes map as Triton maps them (``server/src/http_server.cc`` ``HttpCodeFromError``:
whatever has no HTTP counterpart is 400); the codes Triton does not have (RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, PERMISSION_DENIED, FAILED_PRECONDITION: Shoal's own limits and checks)
keep their HTTP meaning."""

from __future__ import annotations

import logging
from types import MappingProxyType

from shoal.proto.errors import ErrorCode, ServingError, detach, from_exception
from shoal.server.frontends.http.body import BodyError
from shoal.server.logthrottle import client_error

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


def error_answer(exc: Exception, log: logging.Logger, method: str, path: str) -> tuple[int, str]:
    """The status and message a failed request is answered with (a ``BodyError``'s own
    status, else the table's), logged as a client's error or, for anything that is not a
    ``ServingError``, as a bug; the error is detached so that nothing it passed through
    outlives the answer."""
    if isinstance(exc, ServingError):
        status = exc.status if isinstance(exc, BodyError) else HTTP_STATUS[exc.code]
        client_error(log, exc, path)
        message = exc.message
    else:
        log.exception("unhandled error for %s %s", method, path)
        err = from_exception(exc)
        status, message = HTTP_STATUS[err.code], err.message
    detach(exc)
    return status, message
