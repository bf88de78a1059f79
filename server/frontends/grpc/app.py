"""The grpc.aio server: services, message-size limits, keepalive and compression."""

from __future__ import annotations

import grpc

from proto.gen import grpc_service_pb2_grpc as pb_grpc
from proto.gen import health_pb2_grpc
from server.config import GrpcOptions
from server.dataplane import DataPlane
from server.frontends.grpc.service import HealthService, InferenceService

MAX_MESSAGE_BYTES = 2**31 - 1  # Triton's and tritonclient's limit (INT32_MAX)


_LEVELS = {"none": 0, "low": 1, "medium": 2, "high": 3}


async def start_grpc(dataplane: DataPlane, host: str, port: int, opts: GrpcOptions) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", opts.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", opts.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(opts.keepalive_permit_without_calls)),
            ("grpc.http2.max_pings_without_data", opts.http2_max_pings_without_data),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", opts.http2_min_recv_ping_interval_without_data_ms),
            ("grpc.http2.max_ping_strikes", opts.http2_max_ping_strikes),
            ("grpc.so_reuseport", 0),
            ("grpc.default_compression_level", _LEVELS[opts.compression_level]),
        ],
        compression=grpc.Compression.Gzip if opts.compression_level != "none" else grpc.Compression.NoCompression,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(dataplane), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(dataplane), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server, bound
