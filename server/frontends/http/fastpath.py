"""``POST /v2/models/{model}[/versions/{v}]/infer`` without aiohttp's per-request machinery.

aiohttp makes a ``Request``, a ``StreamWriter``, a task, walks the router and the middleware
and prepares a ``StreamResponse`` for every request: on the 2-core box an aiohttp server that
does nothing else served 1.25k small requests a second at c=1 where a bare protocol on the
same parser served 2.5-2.8k. ``FastHandler`` is aiohttp's connection handler with a framer in
front of it. At each message boundary it reads the head itself; an inference request in the
plain form clients send (HTTP/1.1, ``Content-Length``, no content or transfer coding, no
``Expect``, the connection otherwise idle) is answered here by ``routes.infer_answer``, the
code aiohttp's route runs too. Every other message (and any inference request this path
declines, even after its body arrived) is handed to aiohttp byte for byte as it came, in
order, so every other behaviour, error text and limit stays aiohttp's and the router's.

Order on a connection: while aiohttp holds a message, later ones go to aiohttp as well;
while an answer is computed here, later bytes wait (reading pauses past ``_HOLD_BYTES``).

``SHOAL_HTTP_FASTPATH=0`` in the server's environment turns it off (aiohttp serves all).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from shoal.proto.errors import ServingError
from shoal.server.frontends.http import routes
from shoal.server.frontends.http.body import Held, HttpLimits
from shoal.server.frontends.http.connections import ConnectionGuard
from shoal.server.frontends.http.errors import error_answer
from shoal.server.types import UseProxy
from shoal.server.validation import version_number

log = logging.getLogger("shoal.http")

ENABLED = os.environ.get("SHOAL_HTTP_FASTPATH", "1") not in ("0", "false", "no", "off")
_INFER = re.compile(rb"/v2/models/([A-Za-z0-9_.\-]+)(?:/versions/([0-9]+))?/infer")
_MAX_HEAD = 16 << 10
"""A head not complete within this many bytes goes to aiohttp (which has its own limits)."""
_HOLD_BYTES = 1 << 20
_DECLINE_S = 1.0
"""A model version whose request this path handed to aiohttp (the frontend process's proxy)
goes straight to aiohttp for this long."""
_HEADER_LENGTH = b"inference-header-content-length"
_JSON_HEADERS = b"Content-Type: application/json\r\n"
_ERR_HEADERS = b"Content-Type: application/json; charset=utf-8\r\n"


class FastContext:
    """What the fast path needs of the app, read once."""

    def __init__(self, app: web.Application, guard: ConnectionGuard) -> None:
        self.dp: Any = app[routes.DATAPLANE]
        self.limits: HttpLimits = app[routes.LIMITS]
        self.tracer: Any = getattr(self.dp, "tracer", None)
        self.guard = guard
        # restricted APIs and header forwarding are checked by aiohttp's middleware
        self.usable = ENABLED and not app[routes.RESTRICTIONS].rules and not app.get(routes.FORWARD)
        self.declined: dict[tuple[bytes, bytes | None], float] = {}
        self._date = b""
        self._date_at = 0

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date


def handler_factory(app: web.Application, guard: ConnectionGuard) -> Callable[[web.Server], Callable[[], Any]]:
    """For ``GuardedSite(handler=...)``: each connection's handler, a ``FastHandler`` unless
    the fast path cannot serve this app (then aiohttp's own)."""
    ctx = FastContext(app, guard)

    def for_server(server: web.Server) -> Callable[[], Any]:
        if not ctx.usable:
            return server
        missing = missing_internals(server)
        if missing:
            log.warning("HTTP fast path off: this aiohttp has no %s", ", ".join(missing))
            return server
        kwargs = server._kwargs  # what web.Server.__call__ passes to RequestHandler

        def make() -> FastHandler:
            return FastHandler(server, ctx, loop=server._loop, **kwargs)

        return make

    return for_server


_INTERNALS = (
    "_handle_request", "_process_keepalive", "_drain_helper", "_next_keepalive_close_time",
    "_keepalive_timeout", "_keepalive_handle", "_force_close", "_close", "_loop",
)  # fmt: skip
"""aiohttp's private names ``FastHandler`` uses (aiohttp 3.14)."""


def missing_internals(server: web.Server | None = None) -> list[str]:
    """Those of aiohttp's private names the fast path relies on that this aiohttp lacks (an
    upgrade that renames one turns the fast path off instead of breaking connections)."""
    names = set(dir(RequestHandler)) | set(getattr(RequestHandler, "__slots__", ()))
    missing = [n for n in _INTERNALS if n not in names]
    if server is not None and not isinstance(getattr(server, "_kwargs", None), dict):
        missing.append("web.Server._kwargs")
    return missing


class FastHandler(RequestHandler):
    """aiohttp's ``RequestHandler`` with the fast path in front (see the module's doc)."""

    def __init__(self, manager: web.Server, ctx: FastContext, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fx = ctx
        self._buf = b""
        self._slow_left = 0
        """Body bytes of the message aiohttp is reading still to hand over (-1: all bytes,
        for good)."""
        self._slow_open = 0
        """Messages handed to aiohttp and not yet answered."""
        self._fast: asyncio.Task[None] | None = None
        self._body: _Msg | None = None
        self._held = False
        """Reading paused here while an answer is computed (not ``_paused``: that attribute is
        aiohttp's, whether *writing* is paused, which its ``_drain_helper`` waits on; sharing it
        once left a pipelining client's connection unread for good)."""

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if not data:
            # never the transport (it has no empty reads): aiohttp resuming its own parser after
            # its flow control paused it (``resume_reading``), with bytes it holds or a message it
            # has not completed yet; swallowing it left a handed-over request's body unfinished
            super().data_received(data)
            return
        if self._slow_left:
            if self._slow_left < 0:
                super().data_received(data)
                return
            n = self._slow_left
            if len(data) <= n:
                self._slow_left = n - len(data)
                super().data_received(data)
                return
            self._slow_left = 0
            super().data_received(data[:n])
            data = data[n:]
        if self._body is not None:
            data = self._body.add(data)
            if self._body.missing:
                return
            body, self._body = self._body, None
            body.timer.cancel()
            self._start(body)
        self._buf = self._buf + data if self._buf else data
        if self._fast is not None:
            if not self._held and len(self._buf) > _HOLD_BYTES and self.transport is not None:
                self._held = True
                self.transport.pause_reading()
            return
        self._frame()

    def _frame(self) -> None:
        """Take the messages whose heads are in ``_buf``, until one is answered here or the
        buffer ends mid-head."""
        while self._buf and self._fast is None and self._body is None and not self._slow_left:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._to_aiohttp_for_good()
                return
            head_len = end + 4
            msg = self._parse(buf, end) if self._slow_open == 0 else None
            if msg is None:
                length = _content_length(buf, end)
                if length is None:  # chunked, conflicting or odd framing: aiohttp parses it
                    self._to_aiohttp_for_good()
                    return
                self._hand_over(buf, head_len, length)
                continue
            try:
                msg.held.count(msg.length)
            except ServingError:  # over --max-buffered-request-bytes: aiohttp answers 429
                self._hand_over(buf, head_len, msg.length)
                continue
            total = head_len + msg.length
            if len(buf) >= total:
                self._buf = buf[total:]
                msg.data = buf[head_len:total]
                self._start(msg)
                return
            self._buf = b""
            msg.begin_body(buf[head_len:], self)
            self._body = msg

    def _hand_over(self, buf: bytes, head_len: int, length: int) -> None:
        """One message to aiohttp: its head and what is here of its body now, the rest as it
        comes (``_slow_left``)."""
        total = head_len + length
        self._slow_open += 1
        self._buf = buf[total:]
        if len(buf) < total:
            self._slow_left = total - len(buf)
        super().data_received(buf[:total])

    def _to_aiohttp_for_good(self) -> None:
        buf, self._buf = self._buf, b""
        self._slow_left = -1
        self._slow_open += 1
        super().data_received(buf)

    def _parse(self, buf: bytes, end: int) -> _Msg | None:
        """The fast message in ``buf[:end]`` (a head); ``None``: aiohttp answers it."""
        if not buf.startswith(b"POST /v2/models/"):
            return None
        line_end = buf.find(b"\r\n", 0, end)
        first = buf[:line_end] if line_end >= 0 else buf[:end]
        parts = first.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        m = _INFER.fullmatch(parts[1])
        if m is None:
            return None
        length = -1
        header_length: str | None = None
        for line in buf[line_end + 2 : end].split(b"\r\n") if line_end >= 0 else ():
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1:] in b" \t" or name[:1] in b" \t":
                return None
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > 18:
                    return None
                length = int(value)
            elif name == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
            elif name in _SLOW_HEADERS and _slow(name, value):
                return None
        if length < 0:
            return None
        ctx = self._fx
        key = (m[1], m[2])
        if (
            length > ctx.limits.max_body_bytes
            or (ctx.tracer is not None and ctx.tracer.active)
            or (ctx.declined and key in ctx.declined and _still_declined(ctx, key))
            or ctx.guard.reserved(self)
        ):
            return None
        msg = _Msg(m[1].decode(), key, length, header_length, buf[: end + 4], Held(ctx.limits.budget))
        try:
            msg.version = version_number(m[2].decode()) if m[2] is not None else -1
        except ServingError:
            return None
        return msg

    # -- the answer ------------------------------------------------------------------------

    def _start(self, msg: _Msg) -> None:
        self._fast = self._loop.create_task(self._answer(msg))

    async def _answer(self, msg: _Msg) -> None:
        ctx = self._fx
        guard = ctx.guard
        status = 200
        try:
            guard.begin_on(self, "/infer")  # never False: reserve connections went to aiohttp (_parse)
            try:
                payload, json_len = await routes.infer_answer(
                    ctx.dp,
                    ctx.limits,
                    msg.header_length,
                    msg.model,
                    msg.version,
                    msg.data,
                    lambda: guard.peer_on(self.transport, msg.header),
                )
            except UseProxy:
                ctx.declined[msg.key] = time.monotonic() + _DECLINE_S
                self._decline(msg)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the router never dies of one request
                status, message = error_answer(exc, log, "POST", msg.path())
                payload, json_len = routes.error_body(message), None
            finally:
                msg.held.release()
                msg.data = b""
                close = guard.end_on(self)
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            head = _head(status, len(payload), json_len, ctx.date(), close)
            if len(payload) < 65536:
                transport.write(head + payload)
            else:
                transport.writelines((head, payload))
            if close:
                self.force_close()
                transport.close()
                return
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if transport.get_write_buffer_size() > 65536:
                await self._drain_helper()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._fast = None
            if self.transport is not None and not self._force_close:
                if self._held:
                    self._held = False
                    self.transport.resume_reading()
                if self._buf:
                    self._frame()

    def _decline(self, msg: _Msg) -> None:
        """aiohttp answers ``msg`` after all (nothing of it was written here)."""
        self._slow_open += 1
        super().data_received(msg.head + bytes(msg.data))

    # -- aiohttp's side ----------------------------------------------------------------------

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._slow_open -= 1
            if self._slow_open == 0 and self._buf and self._fast is None and self.transport is not None:
                self._loop.call_soon(self._frame)

    def _process_keepalive(self) -> None:
        if self._fast is not None or self._body is not None:
            self._keepalive_handle = self._loop.call_at(
                self._loop.time() + self._keepalive_timeout, self._process_keepalive
            )
            return
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._fast is not None:
            self._fast.cancel()  # handler_cancellation: the model sees is_cancelled()
        if self._body is not None:
            self._body.timer.cancel()
            self._body.held.release()
            self._body = None
        self._buf = b""
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Graceful shutdown: the answer being computed here is finished first."""
        task = self._fast
        if task is not None:
            started = self._loop.time()
            await asyncio.wait([task], timeout=timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (self._loop.time() - started))
        await super().shutdown(timeout)

    def _body_timed_out(self) -> None:
        body = self._body
        if body is None:
            return
        left = body.last + self._fx.limits.body_timeout_s - time.monotonic()
        if left > 0:
            body.timer = self._loop.call_later(left, self._body_timed_out)
            return
        self._body = None
        body.held.release()
        transport = self.transport
        if transport is None:
            return
        timeout_s = self._fx.limits.body_timeout_s
        message = f"timed out reading the request body: no data for {timeout_s:g} s (--http-body-timeout-secs)"
        # what the connection was doing: a client that stopped sending looks like "reading: True"
        # (the bytes never came); reading off here would be the server's own stall
        log.info(
            "HTTP %s: %s; got %d of %d body bytes; reading: %s, held: %s, answering: %s, aiohttp's: %d",
            body.path(),
            message,
            body.length - body.missing,
            body.length,
            transport.is_reading(),
            self._held,
            self._fast is not None,
            self._slow_open,
        )
        payload = routes.error_body(message)
        transport.write(_head(408, len(payload), None, self._fx.date(), True) + payload)
        self.force_close()
        transport.close()


_SLOW_HEADERS = frozenset(
    {b"transfer-encoding", b"content-encoding", b"expect", b"connection", b"upgrade", b"accept-encoding"}
)


def _slow(name: bytes, value: bytes) -> bool:
    """A header that makes aiohttp answer the request (compression either way, ``Expect``,
    ``Connection: close``, an upgrade)."""
    v = value.lower()
    if name == b"content-encoding":
        return v not in (b"", b"identity")
    if name == b"accept-encoding":
        return b"gzip" in v or b"deflate" in v
    if name == b"connection":
        return v != b"keep-alive"
    return True


def _still_declined(ctx: FastContext, key: tuple[bytes, bytes | None]) -> bool:
    if ctx.declined[key] > time.monotonic():
        return True
    del ctx.declined[key]
    return False


def _content_length(buf: bytes, end: int) -> int | None:
    """A head's body length when its framing is plain (no ``Transfer-Encoding``, at most one
    ``Content-Length``); ``None`` otherwise."""
    length: int | None = None
    for line in buf[:end].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            value = value.strip()
            if length is not None or not value.isdigit():
                return None
            length = int(value)
    return length or 0


class _Msg:
    __slots__ = (
        "model", "key", "length", "header_length", "head", "held", "version", "data", "missing", "last", "timer"
    )  # fmt: skip

    def __init__(
        self,
        model: str,
        key: tuple[bytes, bytes | None],
        length: int,
        header_length: str | None,
        head: bytes,
        held: Held,
    ) -> None:
        self.model = model
        self.key = key
        self.length = length
        self.header_length = header_length
        self.head = head
        self.held = held
        """The body's bytes counted in ``--max-buffered-request-bytes`` until answered."""
        self.version = -1
        self.data: bytes | bytearray = b""
        self.missing = 0
        self.last = 0.0
        self.timer: Any = None

    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode("latin-1")

    def header(self, name: str) -> str | None:
        """One of the head's headers (for the peer header of a frontend process)."""
        want = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            n, sep, value = line.partition(b":")
            if sep and n.strip().lower() == want:
                return value.strip().decode("latin-1")
        return None

    def begin_body(self, first: bytes, handler: FastHandler) -> None:
        """The body comes in several reads: gathered into one buffer, with the body timeout."""
        self.data = bytearray(self.length)
        self.data[: len(first)] = first
        self.missing = self.length - len(first)
        self.last = time.monotonic()
        self.timer = handler._loop.call_later(handler._fx.limits.body_timeout_s, handler._body_timed_out)

    def add(self, data: bytes) -> bytes:
        """Take what belongs to the body; the rest (the next message) is returned."""
        n = min(self.missing, len(data))
        at = self.length - self.missing
        assert isinstance(self.data, bytearray)
        self.data[at : at + n] = data[:n] if n < len(data) else data
        self.missing -= n
        self.last = time.monotonic()
        return data[n:]


def _head(status: int, length: int, json_len: int | None, date: bytes, close: bool) -> bytes:
    if status != 200:
        extra = _ERR_HEADERS
    elif json_len is None:
        extra = _JSON_HEADERS
    else:
        extra = b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n" % json_len
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\nDate: %s\r\n%s\r\n" % (
        status,
        HTTPStatus(status).phrase.encode(),
        extra,
        length,
        date,
        b"Connection: close\r\n" if close else b"",
    )
