"""What a frontend process does not serve itself goes to the router's own HTTP and gRPC
servers (Unix sockets in the run directory) unchanged, with the client's address in
``PEER_HEADER`` so that the router knows whose shared memory it is."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import health_pb2
from shoal.server.frontends.grpc.errors import GRPC_STATUS
from shoal.server.peers import PEER_HEADER, Peer, PeerCache, peer_value

log = logging.getLogger("shoal.frontend")

_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host")
)


class HttpProxy:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path, limit=0),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self, request: web.Request, peer: Peer | None, body: bytes | bytearray | None = None
    ) -> web.StreamResponse:
        """``request`` answered by the router; ``body``: already read by the caller."""
        data = body if body is not None else await request.read()
        # a body read by the inference handler is inflated already (its length is its own)
        drop = _HOP | {PEER_HEADER, "content-length"} | ({"content-encoding"} if body is not None else set())
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
        if peer is not None:
            headers.append((PEER_HEADER, peer_value(peer)))
        try:
            up = await self.session().request(
                request.method, "http://router" + request.path_qs, headers=headers, data=data, allow_redirects=False
            )
        except aiohttp.ClientError as exc:
            log.warning("the router did not answer %s %s: %s", request.method, request.path, exc)
            return web.json_response({"error": "the server is restarting; retry later"}, status=503)
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            up.release()


def _metadata(context: Any, peer: str) -> list[tuple[str, str | bytes]]:
    md = [
        (k, v)
        for k, v in (context.invocation_metadata() or ())
        if not k.startswith((":", "grpc-")) and k != PEER_HEADER
    ]
    md.append((PEER_HEADER, peer))
    return md


_ERROR_CODES = {status: code for code, status in GRPC_STATUS.items()}

_METHODS = frozenset(
    f"/{service.full_name}/{m.name}"
    for service in (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    )
    for m in service.methods
)
"""The methods the router serves; grpc answers any other UNIMPLEMENTED here (forwarded, the
router's refusal, which comes before the request is read, could race grpc's own reading)."""


class GrpcProxy(grpc.GenericRpcHandler):
    """Every gRPC method not served here, as raw messages in both directions (a unary call is
    a stream of one on the wire)."""

    def __init__(self, target: str, peers: PeerCache) -> None:
        self.target = target
        self.peers = peers
        """The clients' ``Peer``s, shared with the inference service: a ``Peer`` reads its
        uid from the kernel's socket tables once (8-12 ms on a 2-core box whose tables held
        many closed connections: every forwarded call paid it when each made a new ``Peer``)."""
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
            )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method
        if method not in _METHODS:
            return None

        async def handle(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for item in self.stream(method, requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(handle)

    def peer_of(self, context: Any) -> str:
        return peer_value(self.peers.get(context.peer()))

    async def stream(self, method: str, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        remaining = context.time_remaining()
        forward: Any = self.channel().stream_stream(method)  # raw bytes both ways
        call: Any = forward(requests, metadata=_metadata(context, self.peer_of(context)), timeout=remaining)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as exc:
            context.set_code(exc.code())
            context.set_details(exc.details() or "")
            return
        except asyncio.CancelledError:
            call.cancel()
            raise
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple((k, v) for k, v in trailing if not k.startswith("grpc-")))

    async def relay(self, method: str, request: bytes, context: Any) -> AsyncGenerator[bytes, None]:
        """The router's responses to one request sent on a stream of its own (a request of a
        client's stream that the router must trace); a failure of that stream raises
        ``ServingError`` (the client's stream goes on)."""

        async def one() -> AsyncIterator[bytes]:
            yield request

        forward: Any = self.channel().stream_stream(method)
        call: Any = forward(one(), metadata=_metadata(context, self.peer_of(context)), timeout=context.time_remaining())
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as exc:
            code = _ERROR_CODES.get(exc.code(), ErrorCode.UNAVAILABLE)
            raise ServingError(exc.details() or exc.code().name, code=code) from None
        finally:
            call.cancel()  # nothing once it has ended; else the router stops the request

    async def unary(self, method: str, request: bytes, context: Any) -> bytes | None:
        """One call (the inference handler's way back when the router must trace it)."""

        async def one() -> AsyncIterator[bytes]:
            yield request

        out = None
        async for resp in self.stream(method, one(), context):
            out = resp
        return out
