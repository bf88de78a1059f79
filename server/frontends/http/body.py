"""Reading an inference request body within limits.

One limit, ``--http-max-body-size``, bounds a body as the server will hold it: the bytes on
the wire for a plain body, the inflated bytes for a gzip/deflate one. A ``Content-Length``
over it is answered 413 before a byte of the body is read (also instead of ``100 Continue``);
a chunked body is cut off as soon as it passes the limit. A compressed body is inflated in
a worker thread with the output bounded by the limit, so a small gzip bomb costs at most the
limit and never stalls the event loop. A client that stops sending in the middle of its body
gets 408 after ``--http-body-timeout-secs``. The bytes of all bodies held at once count in the
server's ``RequestBudget`` (``--max-buffered-request-bytes``): past it, new requests get 429.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError, Unsupported
from shoal.server.resources import RequestBudget

log = logging.getLogger("shoal.http")

_PIECE = 4 << 20
"""Inflated bytes per step: the first step runs on the loop, later ones in a thread."""
_ENCODINGS = ("identity", "gzip", "deflate")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What an HTTP request may cost (see ``server.config.ServerConfig``)."""

    max_body_bytes: int
    max_json_bytes: int
    body_timeout_s: float
    budget: RequestBudget


class BodyError(ServingError):
    """A body the server stops reading: answered with ``status`` (413, 408) and
    ``Connection: close``."""

    def __init__(self, message: str, *, status: int, code: ErrorCode) -> None:
        super().__init__(message, code=code)
        self.status = status


def too_large(nbytes: int | None, limit: int) -> BodyError:
    size = f"of {nbytes} bytes " if nbytes is not None else ""
    return BodyError(
        f"request body {size}exceeds the maximum allowed size of {limit} bytes. "
        "Use --http-max-body-size to increase the limit.",
        status=413,
        code=ErrorCode.RESOURCE_EXHAUSTED,
    )


def encoding_of(request: web.Request) -> str:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in _ENCODINGS:
        raise Unsupported(f"unsupported Content-Encoding '{encoding[:32]}'; use gzip, deflate or identity")
    return encoding


def check_length(request: web.Request, limit: int) -> None:
    """413 at once when the declared length is over the limit (no body byte read)."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(length, limit)


class Held:
    """A body read within the limits; ``release`` gives its bytes back to the budget."""

    __slots__ = ("data", "_budget", "_counted")

    def __init__(self, budget: RequestBudget) -> None:
        self.data: bytes | bytearray = bytearray()
        self._budget = budget
        self._counted = 0

    def count(self, nbytes: int) -> None:
        self._budget.take(nbytes)
        self._counted += nbytes

    def uncount(self, nbytes: int) -> None:
        self._budget.give(nbytes)
        self._counted -= nbytes

    def release(self) -> None:
        self.uncount(self._counted)
        self.data = b""


async def _read_exactly(stream: Any, first: bytes, length: int, timeout_s: float) -> bytearray:
    """``length`` bytes (the Content-Length, already checked against the limit) into one
    buffer: no reallocation as chunks arrive."""
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    chunk = first
    while True:
        if chunk:
            n = len(chunk)
            if got + n > length:
                raise InvalidInput(f"the request body is longer than its Content-Length of {length} bytes")
            view[got : got + n] = chunk
            got += n
        if got == length and stream.at_eof():
            return buf
        chunk = stream.read_nowait()
        if chunk:
            continue
        if stream.at_eof():
            raise InvalidInput(f"the request body has {got} bytes, Content-Length says {length}")
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await stream.readany()
        except TimeoutError:
            raise _timed_out(timeout_s) from None
        if not chunk and stream.at_eof() and got != length:
            raise InvalidInput(f"the request body has {got} bytes, Content-Length says {length}")


def _timed_out(timeout_s: float) -> BodyError:
    return BodyError(
        f"timed out reading the request body: no data for {timeout_s:g} s (--http-body-timeout-secs)",
        status=408,
        code=ErrorCode.DEADLINE_EXCEEDED,
    )


async def read(request: web.Request, *, limit: int, timeout_s: float, budget: RequestBudget) -> Held:
    """The request body (inflated when compressed), at most ``limit`` bytes, counted in
    ``budget`` until ``Held.release``. Raises 413, 408, 400 or 429 as ``ServingError``."""
    encoding = encoding_of(request)
    check_length(request, limit)
    held = Held(budget)
    try:
        length = request.content_length
        if length:
            held.count(length)
        stream = request.content
        if length and encoding == "identity":
            # the usual case: a declared length, often all of it already here with the headers
            first = stream.read_nowait()
            if len(first) == length and stream.at_eof():
                held.data = first
                return held
            held.data = await _read_exactly(stream, first, length, timeout_s)
            return held
        raw = bytearray()
        held.data = raw
        while True:
            # what has arrived already is taken without a timer (a small body usually came
            # with its headers); only waiting for more is bounded by the timeout
            chunk = stream.read_nowait()
            if not chunk:
                if stream.at_eof():
                    break
                try:
                    async with asyncio.timeout(timeout_s):
                        chunk = await stream.readany()
                except TimeoutError:
                    raise _timed_out(timeout_s) from None
                if not chunk:
                    break
            if len(raw) + len(chunk) > limit:
                raise too_large(None, limit)
            if length is None:
                held.count(len(chunk))
            raw += chunk
        if length is not None and len(raw) != length:
            raise InvalidInput(f"the request body has {len(raw)} bytes, Content-Length says {length}")
        if encoding != "identity":
            compressed = len(raw)
            held.data = await _inflate(raw, encoding, limit, held)
            del raw
            held.uncount(compressed)
    except BaseException as exc:
        held.release()
        if isinstance(exc, BodyError) and exc.status == 408:  # as the fast path logs it
            transport = request.transport
            reading = transport.is_reading() if transport is not None else None
            log.info("HTTP %s: %s; reading: %s (aiohttp's)", request.path, exc.message, reading)
        raise
    return held


async def _inflate(data: bytearray, encoding: str, limit: int, held: Held) -> bytearray:
    """Inflate a gzip or deflate body in pieces of at most ``_PIECE`` bytes, each counted in
    the budget as it comes: the first on the loop, the rest in a worker thread (zlib releases
    the GIL), so a bomb costs at most ``limit`` bytes and never stalls other clients."""
    if encoding == "gzip":
        wbits = 31
    else:
        # HTTP's "deflate" is zlib-wrapped (RFC 1950), but raw deflate is common too
        wbits = 15 if data[:1] and data[0] & 0x0F == 8 else -15
    inflater = zlib.decompressobj(wbits=wbits)
    out = bytearray()
    pending: bytes | bytearray = data
    first = True
    while True:
        try:
            if first:
                piece = inflater.decompress(pending, _PIECE)
            else:
                piece = await asyncio.to_thread(inflater.decompress, pending, _PIECE)
        except zlib.error as exc:
            raise InvalidInput(f"failed to decompress the request body ({encoding}): {exc}") from None
        first = False
        pending = inflater.unconsumed_tail
        if len(out) + len(piece) > limit:
            raise too_large(None, limit)
        held.count(len(piece))
        out += piece
        if inflater.eof:
            break
        if not pending and not piece:
            raise InvalidInput(f"failed to decompress the request body ({encoding}): the compressed data is truncated")
    if inflater.unused_data:
        raise InvalidInput(f"failed to decompress the request body ({encoding}): data after the end of the stream")
    return out
