"""The HTTP fast path relies on some of aiohttp's private names; an aiohttp without them turns
the fast path off (with a warning) instead of breaking connections."""

from __future__ import annotations

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
