"""Error codes: the HTTP table is complete, and foreign exceptions are wrapped as INTERNAL."""

from __future__ import annotations

import pytest

from shoal.proto import errors
from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.frontends.http.errors import HTTP_STATUS


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_an_http_status(code: ErrorCode) -> None:
    assert code in HTTP_STATUS
    assert 400 <= HTTP_STATUS[code] <= 599


def test_http_table_has_only_error_codes() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        # Triton's HttpCodeFromError: what has no HTTP counterpart is 400
        (ErrorCode.INVALID_ARGUMENT, 400),
        (ErrorCode.NOT_FOUND, 404),
        (ErrorCode.UNAVAILABLE, 503),
        (ErrorCode.UNIMPLEMENTED, 501),
        (ErrorCode.INTERNAL, 500),
        (ErrorCode.UNKNOWN, 400),
        (ErrorCode.ALREADY_EXISTS, 400),
        (ErrorCode.CANCELLED, 400),
    ],
)
def test_key_http_statuses(code: ErrorCode, status: int) -> None:
    assert HTTP_STATUS[code] == status


def test_http_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        HTTP_STATUS[ErrorCode.INTERNAL] = 200  # type: ignore[index]


def test_from_exception_wraps_value_error() -> None:
    wrapped = errors.from_exception(ValueError("msg"))
    assert type(wrapped) is ServingError
    assert wrapped.code is ErrorCode.INTERNAL
    assert wrapped.message == "builtins.ValueError: msg"
    assert str(wrapped) == "builtins.ValueError: msg"


def test_from_exception_names_module_and_qualified_class() -> None:
    class Inner(RuntimeError):
        pass

    wrapped = errors.from_exception(Inner("boom"))
    assert wrapped.message == f"{__name__}.test_from_exception_names_module_and_qualified_class.<locals>.Inner: boom"


@pytest.mark.parametrize(
    "exc",
    [
        errors.InvalidInput("bad"),
        errors.WorkerDied("gone"),
        ServingError("x", code=ErrorCode.CANCELLED),
    ],
)
def test_from_exception_keeps_serving_errors(exc: ServingError) -> None:
    assert errors.from_exception(exc) is exc


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidInput, ErrorCode.INVALID_ARGUMENT),
        (errors.ModelNotReady, ErrorCode.UNAVAILABLE),
        (errors.QueueFull, ErrorCode.UNAVAILABLE),
        (errors.DeadlineExceeded, ErrorCode.DEADLINE_EXCEEDED),
        (errors.WorkerDied, ErrorCode.UNAVAILABLE),
        (errors.Unsupported, ErrorCode.UNIMPLEMENTED),
    ],
)
def test_subclass_codes(cls: type[ServingError], code: ErrorCode) -> None:
    e = cls("m")
    assert e.code is code
    assert e.message == "m"


def test_explicit_code_overrides_class_code() -> None:
    e = errors.InvalidInput("m", code=ErrorCode.NOT_FOUND)
    assert e.code is ErrorCode.NOT_FOUND
    assert repr(e) == "InvalidInput(NOT_FOUND, 'm')"


def test_grpc_table_covers_every_code() -> None:
    from shoal.server.frontends.grpc.errors import GRPC_STATUS

    assert set(GRPC_STATUS) == set(ErrorCode)
    assert GRPC_STATUS[ErrorCode.UNAVAILABLE].name == "UNAVAILABLE"
    assert GRPC_STATUS[ErrorCode.UNIMPLEMENTED].name == "UNIMPLEMENTED"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        # Triton's grpc_utils.cc: each of its codes to the same-named status
        (ErrorCode.UNKNOWN, "UNKNOWN"),
        (ErrorCode.INTERNAL, "INTERNAL"),
        (ErrorCode.NOT_FOUND, "NOT_FOUND"),
        (ErrorCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (ErrorCode.UNAVAILABLE, "UNAVAILABLE"),
        (ErrorCode.UNIMPLEMENTED, "UNIMPLEMENTED"),
        (ErrorCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (ErrorCode.CANCELLED, "CANCELLED"),
    ],
)
def test_grpc_statuses_of_triton_codes(code: ErrorCode, status: str) -> None:
    from shoal.server.frontends.grpc.errors import GRPC_STATUS

    assert GRPC_STATUS[code].name == status


# ---- Triton's error texts (shoal.proto.errortexts) ------------------------------------------------


def test_error_text_table_entries_are_used_and_formed() -> None:
    """Every entry is raised somewhere (no dead texts), names where Triton raises it, and
    formats with the fields its template names."""
    import re
    import string
    from pathlib import Path

    from shoal.proto import errortexts as T

    root = Path(__file__).resolve().parents[2]
    code = "\n".join(
        p.read_text()
        for folder in ("server", "workers", "proto", "shm")
        for p in (root / folder).rglob("*.py")
        if p.name != "errortexts.py"
    )
    assert len(T.TABLE) >= 50
    for name, entry in T.TABLE.items():
        assert re.search(rf"\bT\.{name}\b", code), f"{name} is not used"
        assert entry.source.startswith(("core/", "server/")), name
        fields = {f for _, f, _, _ in string.Formatter().parse(entry.template) if f}
        err = entry(request_id="", **{f: f"<{f}>" for f in fields})
        assert err.code is entry.code and err.message.startswith("[request id: <id_unknown>] " * entry.request_prefix)
        assert isinstance(err, errors.InvalidInput) == (entry.code is ErrorCode.INVALID_ARGUMENT) or entry.kind
        if entry.triton_code is not None:  # Triton's 5xx for a client's mistake: 400 here
            assert (entry.triton_code, entry.code) == (ErrorCode.INTERNAL, ErrorCode.INVALID_ARGUMENT), name


def test_error_texts_as_triton_writes_them() -> None:
    from shoal.proto import errortexts as T

    assert T.dims([-1, 16]) == "[-1,16]" and T.dims([]) == "[]"
    assert T.UNKNOWN_MODEL(model="x").message == "Request for unknown model: 'x' is not found"
    assert T.QUEUE_FULL("r7").message == "[request id: r7] Exceeds maximum queue size"
    assert isinstance(T.QUEUE_FULL(), errors.QueueFull) and T.QUEUE_FULL().code is ErrorCode.UNAVAILABLE
