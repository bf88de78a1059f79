"""The HTTP fast path relies on some of aiohttp's private names; an aiohttp without them turns
the fast path off (with a warning) instead of breaking connections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shoal.server.frontends.http import fastpath


def test_the_installed_aiohttp_has_them() -> None:
    # fails when an aiohttp upgrade silently turned the fast path off
    assert fastpath.missing_internals() == []


def test_an_aiohttp_without_them_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Old:
        __slots__ = ("_loop", "_force_close", "_close", "_keepalive_handle")

        def _handle_request(self) -> None: ...

        def _drain_helper(self) -> None: ...

    monkeypatch.setattr(fastpath, "RequestHandler", Old)
    missing = fastpath.missing_internals(object())  # type: ignore[arg-type]
    assert missing == ["_process_keepalive", "_next_keepalive_close_time", "_keepalive_timeout", "web.Server._kwargs"]


def test_its_own_state_shadows_none_of_aiohttps() -> None:
    """FastHandler's own attributes are not names aiohttp's handler classes use: sharing one
    (the reading hold once used ``_paused``, aiohttp's writing-paused flag) corrupts both."""
    aiohttp_names: set[str] = set()
    for cls in fastpath.FastHandler.__mro__[1:]:
        aiohttp_names.update(getattr(cls, "__slots__", ()))
        aiohttp_names.update(vars(cls))
    source = Path(fastpath.__file__).read_text()
    handler = source[source.index("class FastHandler") : source.index("\n_SLOW_HEADERS")]
    assigned = set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=", handler))
    meant = {"_keepalive_handle", "_next_keepalive_close_time"}  # aiohttp's, set on purpose
    assert assigned, "no attributes found: the pattern is out of date"
    assert (assigned & aiohttp_names) - meant == set()
