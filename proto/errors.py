"""The one error type of Shoal and its transport-neutral codes.

``ErrorCode`` values equal the ``shoal.worker.ErrorCode`` enum of ``worker.proto`` (a unit
test checks this), so an error crosses the router/worker boundary as ``(code, message)``
and is never pickled. Each frontend maps codes to its own status in exactly one table.
Errors that Triton also has take its text and code from ``shoal.proto.errortexts``.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum


class ErrorCode(IntEnum):
    """Neutral error codes; the frontends map them to HTTP and gRPC statuses."""

    UNKNOWN = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    ALREADY_EXISTS = 3
    FAILED_PRECONDITION = 4
    RESOURCE_EXHAUSTED = 5
    UNAVAILABLE = 6
    DEADLINE_EXCEEDED = 7
    CANCELLED = 8
    UNIMPLEMENTED = 9
    INTERNAL = 10
    PERMISSION_DENIED = 11


class ServingError(Exception):
    """An error with a code that a frontend can report to a client.

    ``message`` is sent to clients as is: it must name what was wrong and must never
    carry secrets (shm keys, file paths outside the repository).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class InvalidInput(ServingError):
    code = ErrorCode.INVALID_ARGUMENT


class ModelNotReady(ServingError):
    code = ErrorCode.UNAVAILABLE


class QueueFull(ServingError):
    """A scheduler queue at its ``max_queue_size`` (Triton: UNAVAILABLE)."""

    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """A request past its deadline (a queue policy's timeout is Triton's UNAVAILABLE)."""

    code = ErrorCode.DEADLINE_EXCEEDED


class BackendError(ServingError):
    """An error a worker reported for a request (the backend or model failed it)."""


class WorkerDied(ServingError):
    code = ErrorCode.UNAVAILABLE


class Unsupported(ServingError):
    code = ErrorCode.UNIMPLEMENTED


class PermissionDenied(ServingError):
    code = ErrorCode.PERMISSION_DENIED


def from_exception(exc: BaseException) -> ServingError:
    """Wrap any exception as a ServingError: ``INTERNAL`` with ``"<module.Class>: <msg>"``."""
    if isinstance(exc, ServingError):
        return exc
    cls = type(exc)
    return ServingError(f"{cls.__module__}.{cls.__qualname__}: {exc}", code=ErrorCode.INTERNAL)


def detach(exc: BaseException) -> None:
    """Drop what an answered error still holds. Its traceback keeps every frame it passed
    through alive (request bodies included), and a frame that holds the error (``raise
    result``, a future's exception) makes a cycle that only a full garbage collection
    frees. Frontends call this once the error is turned into a response."""
    cur: BaseException | None = exc
    for _ in range(16):
        if cur is None:
            break
        nxt = cur.__context__ or cur.__cause__
        cur.__traceback__ = None
        cur.__context__ = None
        cur.__cause__ = None
        cur = nxt


FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
"""The ``reason`` label of Triton's ``nv_inference_request_failure``."""


def failure_reason(exc: BaseException) -> str:
    """Which ``FAILURE_REASONS`` a request that raised ``exc`` counts under."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELED"
    if isinstance(exc, BackendError | WorkerDied):
        return "BACKEND"
    if isinstance(exc, QueueFull | DeadlineExceeded):  # Triton's UNAVAILABLE, or the server's deadline
        return "REJECTED"
    if isinstance(exc, ServingError):
        if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
            return "REJECTED"
        if exc.code is ErrorCode.CANCELLED:
            return "CANCELED"
    return "OTHER"
