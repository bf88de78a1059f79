"""Checking requests: the version a client names (``version_number``) here; the request
against the model's configuration in ``proto.validation`` (shared with workers' BLS calls)."""

from __future__ import annotations

from shoal.proto import errortexts as T
from shoal.proto.validation import validate

__all__ = ["validate", "version_number"]

_MAX_VERSION_DIGITS = 18


def version_number(text: str) -> int:
    """A model version as clients write it ("": the version policy chooses, -1); raises
    Triton's errors for anything but up to 18 ASCII digits (quoting at most 64 characters)."""
    if not text:
        return -1
    if text.isascii() and text.isdigit() and len(text) <= _MAX_VERSION_DIGITS:
        return int(text)
    shown = text[:64]
    digits = text[1:]
    if text.startswith("-") and digits.isascii() and digits.isdigit() and len(digits) <= _MAX_VERSION_DIGITS:
        raise T.VERSION_NEGATIVE(version=shown)
    raise T.VERSION_PARSE(version=shown)
