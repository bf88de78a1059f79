"""The grpc.aio server: services, message-size limits, connection limits, keepalive and
compression. Requests that do not parse are answered INVALID_ARGUMENT by the services
(``service.MALFORMED``), not UNKNOWN by grpc."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import health_pb2
from shoal.server import restrict
from shoal.server.config import GrpcOptions, TlsOptions
from shoal.server.dataplane import DataPlane
from shoal.server.frontends.grpc.common import MALFORMED
from shoal.server.frontends.grpc.service import HealthService, InferenceService
from shoal.server.headerforward import HeaderForwarder
from shoal.server.peers import PeerCache
from shoal.server.resources import RequestBudget

MAX_MESSAGE_BYTES = 2**31 - 1  # Triton's and tritonclient's limit (INT32_MAX)
HANDSHAKE_TIMEOUT_MS = 10_000
"""A connection that has not finished its HTTP/2 handshake by then is closed."""
MAX_CONNECTION_IDLE_MS = 300_000
"""A connection with no call for this long is closed (clients reconnect on their next call)."""


_LEVELS = {"none": 0, "low": 1, "medium": 2, "high": 3}


class GrpcBindError(OSError):
    """grpc could not listen on ``host``:``port`` (it does not say why)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"cannot bind gRPC to {host}:{port}")
        self.host = host
        self.port = port


class _ClientWentAway(logging.Filter):
    """grpc logs an ERROR with a traceback when a client cancels a stream while a response
    is being written to it; that is the client's doing, worth a verbose line at most."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "ExecuteBatchError" not in record.getMessage():
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return logging.getLogger("shoal").isEnabledFor(logging.DEBUG)


logging.getLogger("grpc._cython.cygrpc").addFilter(_ClientWentAway())


def _safe(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, or worse: the service answers
            return MALFORMED

    return deserialize


def _handler(servicer: object, service: Any, module: Any, only: tuple[str, ...] = ()) -> grpc.GenericRpcHandler:
    """The service's method handlers (``only`` those named, if any), with deserializers that
    never raise."""
    handlers = {}
    for m in service.methods:
        if only and m.name not in only:
            continue
        request = getattr(module, m.input_type.name)
        response = getattr(module, m.output_type.name)
        kw = {"request_deserializer": _safe(request.FromString), "response_serializer": response.SerializeToString}
        fn = getattr(servicer, m.name)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(fn, **kw)
        elif m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(fn, **kw)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(fn, **kw)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def make_server(opts: GrpcOptions, *, max_connections: int = 0) -> grpc.aio.Server:
    """A grpc.aio server with Shoal's message-size, keepalive, connection and compression
    settings (no services yet)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", opts.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", opts.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(opts.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", opts.http2_max_pings_without_data),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", opts.http2_min_recv_ping_interval_without_data_ms),
        ("grpc.http2.max_ping_strikes", opts.http2_max_ping_strikes),
        ("grpc.so_reuseport", int(opts.reuse_port)),
        ("grpc.default_compression_level", _LEVELS[opts.compression_level]),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
    ]
    if max_connections:
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    if opts.max_connection_age_ms:
        options.append(("grpc.max_connection_age_ms", opts.max_connection_age_ms))
    if opts.max_connection_age_grace_ms:
        options.append(("grpc.max_connection_age_grace_ms", opts.max_connection_age_grace_ms))
    return grpc.aio.server(
        options=options,
        compression=grpc.Compression.Gzip if opts.compression_level != "none" else grpc.Compression.NoCompression,
    )


def bind(server: grpc.aio.Server, host: str, port: int, tls: TlsOptions | None) -> int:
    """Listen on ``host``:``port`` (a ``host`` of ``unix:PATH``: that socket); returns the
    bound port; raises ``GrpcBindError``."""
    if host.startswith("unix:"):
        address = host
    else:  # grpc reads "::1:8001" as a name: an IPv6 address needs its brackets
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = None if tls is None else _credentials(tls)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise GrpcBindError(host, port)
    return bound


def service_handler(servicer: object, only: tuple[str, ...] = ()) -> grpc.GenericRpcHandler:
    """``servicer``'s inference methods (``only`` those named, if any), each as the service
    defines it."""
    return _handler(servicer, pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], pb, only)


async def start_grpc(
    dataplane: DataPlane,
    host: str,
    port: int,
    opts: GrpcOptions,
    *,
    max_connections: int = 0,
    stream_max_pending: int = 256,
    restrictions: restrict.Restrictions | None = None,
    budget: RequestBudget | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port. ``host`` ``unix:PATH``: a Unix
    socket, without TLS (the frontend processes' way in)."""
    server = make_server(opts, max_connections=max_connections)
    rules = restrictions or restrict.Restrictions()
    peers = PeerCache(0)
    inference = InferenceService(
        dataplane,
        restrictions=rules,
        peers=peers,
        stream_max_pending=stream_max_pending,
        budget=budget,
        forward=HeaderForwarder(opts.header_forward_pattern),
    )
    health = HealthService(dataplane, restrictions=rules)
    server.add_generic_rpc_handlers(
        (
            service_handler(inference),
            _handler(health, health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2),
        )
    )
    unix = host.startswith("unix:")
    bound = bind(server, host, port, None if unix else opts.tls)
    peers.server_port = 0 if unix else bound
    await server.start()
    return server, bound


def _credentials(tls: TlsOptions) -> grpc.ServerCredentials:
    """``--grpc-use-ssl``: the server's key pair; ``--grpc-use-ssl-mutual``: clients must
    present a certificate signed by the root certificate."""
    key = Path(tls.server_key).read_bytes()
    cert = Path(tls.server_cert).read_bytes()
    root = Path(tls.root_cert).read_bytes() if tls.root_cert else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=root, require_client_auth=tls.mutual)
