"""The HTTP listener with a bound on open connections, and who is on each one.

At most ``max_connections`` connections are open for clients. When one more arrives, the
connection that has been idle longest (no request in progress for a second or more: a
keep-alive connection, or one that never sent complete headers) is closed to make room, so
connections that are opened and left hanging cannot lock out real clients (a flood of new
connections faster than ``max_connections`` a second still can: that needs a limit in
front of the server). When every connection is busy, a
reserve (one sixteenth, at least 16) is still accepted for the health endpoints only (each
answers one request, then closes, and is closed after ``RESERVE_TIMEOUT_S`` regardless), so
a kubelet or load balancer can tell the server is alive while it is saturated. Past the
reserve, a connection gets a 503 written at once and is closed. Idle connections are also
closed by aiohttp's keep-alive timer (``--http-keepalive-timeout-secs``), which runs from the
moment a connection opens until its first request's headers are complete.
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from shoal.server.peers import PEER_HEADER, UNKNOWN, Peer, parse_peer

_FULL_BODY = b'{"error":"the server has too many open HTTP connections; retry later"}'
_FULL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_FULL_BODY)).encode() + b"\r\n\r\n" + _FULL_BODY
)
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
RESERVE_TIMEOUT_S = 5.0
EVICT_GRACE_S = 1.0


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes: the connection does not stay open."""

    def connection_made(self, transport: Any) -> None:
        transport.write(_FULL_RESPONSE)
        transport.close()


class _State:
    __slots__ = ("busy", "since", "opened", "reserve", "seen")

    def __init__(self, reserve: bool) -> None:
        self.busy = 0
        self.opened = self.since = time.monotonic()
        self.reserve = reserve
        self.seen = False
        """Seen connected (a handler gets its connection a moment after it is made)."""


class ConnectionGuard:
    """Counts connections, tells idle from busy ones, and remembers each one's ``Peer``.
    Owned by the router's loop."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.reserve = max(16, max_connections // 16)
        self._states: dict[object, _State] = {}
        """Per aiohttp request handler (one per connection; they cannot be weakly
        referenced, so closed ones are pruned when the guard looks for room)."""
        self._peers: weakref.WeakKeyDictionary[object, Peer] = weakref.WeakKeyDictionary()
        self._next_prune = 64
        self.evicted = 0
        self.refused = 0

    def factory(
        self, server: web.Server, handler: Callable[[], asyncio.Protocol] | None = None
    ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of a listener: ``handler`` (default: ``server``) makes each
        admitted connection's aiohttp request handler."""
        make_handler = handler or server

        def make() -> asyncio.Protocol:
            # called by the event loop for every accepted socket: must never raise
            try:
                return self._admit(server, make_handler)
            except Exception:  # noqa: BLE001
                return _Refuse()

        return make

    def _admit(self, server: web.Server, make_handler: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        if len(self._states) >= min(self._next_prune, self.max_connections):
            # near the limit, or twice as many entries as open connections at the last look:
            # walking every connection stays amortized O(1) per accepted one
            self._prune(server)
            self._next_prune = 2 * len(self._states) + 64
        regular = sum(1 for s in self._states.values() if not s.reserve) if self._states else 0
        reserve = False
        if regular >= self.max_connections and not self._evict_idle():
            if len(self._states) - regular >= self.reserve:
                self.refused += 1
                return _Refuse()
            reserve = True
        handler = make_handler()
        self._states[handler] = _State(reserve)
        if reserve:
            asyncio.get_running_loop().call_later(RESERVE_TIMEOUT_S, _close, handler)
        return handler

    def _prune(self, server: web.Server) -> None:
        """Forget connections that have closed: those aiohttp no longer counts, once seen
        connected (or made more than a second ago and never connected)."""
        connected: set[object] = set(server.connections)
        now = time.monotonic()
        kept: dict[object, _State] = {}
        for handler, state in self._states.items():
            if handler in connected:
                state.seen = True
                kept[handler] = state
            elif not state.seen and now - state.opened < 1.0:
                kept[handler] = state
        self._states = kept

    def _evict_idle(self) -> bool:
        """Close the regular connection idle longest (for at least ``EVICT_GRACE_S``: a new
        connection whose request is still in the socket is not idle); ``False`` when none is."""
        oldest = time.monotonic() - EVICT_GRACE_S
        idle = [
            (s.since, id(h), h)
            for h, s in self._states.items()
            if not s.busy and not s.reserve and s.since <= oldest and _open(h)
        ]
        if not idle:
            return False
        _, _, handler = min(idle)
        del self._states[handler]
        _close(handler)
        self.evicted += 1
        return True

    def begin(self, request: web.Request) -> bool:
        """A request starts on its connection; ``False``: the connection is of the reserve
        and the request is not a health check (answer 503 and close)."""
        return self.begin_on(request.protocol, request.path)

    def begin_on(self, handler: object, path: str) -> bool:
        """``begin`` for the request of ``path`` on ``handler``'s connection."""
        state = self._states.get(handler)
        if state is None:
            return True
        state.seen = True
        if state.reserve and path not in HEALTH_PATHS:
            return False
        state.busy += 1
        return True

    def end(self, request: web.Request) -> bool:
        """The request is answered; ``True`` when its connection must close after it."""
        return self.end_on(request.protocol)

    def end_on(self, handler: object) -> bool:
        state = self._states.get(handler)
        if state is None:
            return False
        state.busy -= 1
        state.since = time.monotonic()
        return state.reserve

    def reserved(self, handler: object) -> bool:
        """``handler``'s connection is of the reserve (health checks only)."""
        state = self._states.get(handler)
        return state is not None and state.reserve

    def peer(self, request: web.Request) -> Peer:
        """The client of ``request``'s connection (its uid is read once per connection);
        ``UNKNOWN`` when its address cannot be read."""
        return self.peer_on(request.transport, request.headers.get)

    def peer_on(self, transport: Any, header: Callable[[str], str | None]) -> Peer:
        """``peer`` of the connection of ``transport`` (``header``: the request's headers)."""
        if transport is None:
            return UNKNOWN
        peer = self._peers.get(transport)
        if peer is None:
            peername = transport.get_extra_info("peername")
            sockname = transport.get_extra_info("sockname")
            if isinstance(sockname, str):  # the router's Unix socket: a frontend process forwards
                return parse_peer(header(PEER_HEADER))
            if not isinstance(peername, tuple) or not isinstance(sockname, tuple):
                return UNKNOWN
            peer = Peer(host=str(peername[0]), port=int(peername[1]), server_port=int(sockname[1]))
            self._peers[transport] = peer
        return peer


def _open(handler: object) -> bool:
    return getattr(handler, "transport", None) is not None


def _close(handler: object) -> None:
    transport = getattr(handler, "transport", None)
    if transport is not None:
        transport.close()


class GuardedSite(web.SockSite):
    """``web.SockSite`` whose connections go through a ``ConnectionGuard``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        guard: ConnectionGuard,
        *,
        backlog: int,
        handler: Callable[[web.Server], Callable[[], asyncio.Protocol]] | None = None,
    ) -> None:
        """``handler``: given the runner's ``web.Server``, the factory of each connection's
        request handler (``fastpath.handler_factory``; default: aiohttp's own)."""
        super().__init__(runner, sock, backlog=backlog)
        self._guard = guard
        self._handler = handler

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert isinstance(server, web.Server)
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.factory(server, self._handler(server) if self._handler else None),
            sock=self._sock,
            backlog=self._backlog,
        )
