"""``ServerConfig``: the command line, parsed and validated in one place.

All errors are collected and reported together. Nothing else in the router reads the
environment or the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shoal.server import restrict
from shoal.server.cloudrepo import is_remote
from shoal.server.flags import TYPES, build_parser, convert

CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True, slots=True)
class GrpcOptions:
    """gRPC transport settings (Triton's flag names and defaults)."""

    keepalive_time_ms: int = 7_200_000
    keepalive_timeout_ms: int = 20_000
    keepalive_permit_without_calls: bool = False
    http2_max_pings_without_data: int = 2
    http2_min_recv_ping_interval_without_data_ms: int = 300_000
    http2_max_ping_strikes: int = 2
    compression_level: str = "none"
    """Default response compression (gzip) level: none, low, medium, high. Clients may
    also ask for compression per call."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model_repository: Path
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    allow_metrics: bool = True
    allow_gpu_metrics: bool = True
    allow_cpu_metrics: bool = True
    metrics_interval_ms: int = 2000
    """How often CPU and GPU metrics are sampled."""
    exit_timeout_s: float = 30.0
    log_verbose: int = 0
    strict_model_config: bool = False
    disable_auto_complete: bool = False
    strict_readiness: bool = True
    server_id: str = "shoal"
    """The name server metadata reports (``--id``; Triton's default is "triton")."""
    model_control_mode: str = "none"
    repository_poll_s: float = 15.0
    model_repository_url: str = ""
    """An object-storage repository (``s3://...``, ``gs://...``); ``model_repository`` is
    then the local copy the server makes."""
    load_models: tuple[str, ...] = ()
    """Models to load at start in explicit mode (``*``: all)."""
    http_max_input_bytes: int = 64 << 20
    """Largest JSON request body (Triton's --http-max-input-size)."""
    http_max_body_bytes: int = 2 << 30
    """Largest inference request body (binary tensors included; inflated size when compressed)."""
    max_buffered_request_bytes: int = 0
    """Bytes of HTTP bodies and gRPC messages held at once, all requests together (0: half the
    machine's memory)."""
    http_body_timeout_s: float = 60.0
    """A request body that sends nothing for this long is answered 408."""
    http_keepalive_timeout_s: float = 75.0
    """An idle connection (or one that never finishes its request headers) is closed after this."""
    http_max_connections: int = 0
    """Open HTTP connections served fully (0: from the descriptor limit); past it, a reserve of
    connections answers health checks only, and further ones are refused."""
    grpc_max_connections: int = 0
    """Open gRPC connections (0: from the descriptor limit)."""
    grpc_stream_max_pending: int = 256
    """Requests of one gRPC stream in flight or answered but not yet read by the client; the
    stream's next request is not read until this drops."""
    http_restricted_api: tuple[str, ...] = ()
    grpc_restricted_protocol: tuple[str, ...] = ()
    client_shm_access: str = "local"
    """``local``: only clients on this host register shared memory, only objects of their own
    user, each client sees its own regions; ``any``: Triton's behaviour."""
    client_shm_key_prefixes: tuple[str, ...] = ()
    client_shm_mapped: bool = False
    """Workers map client system regions and use them in place (no input copy; a client that
    truncates its object during a request can crash the worker with SIGBUS)."""
    client_shm_max_regions: int = 4096
    client_shm_max_regions_per_client: int = 1024
    max_worker_processes: int = 0
    """Worker processes (model instances) the server runs at most (0: 16 per CPU, at least 64)."""
    worker_heartbeat_timeout_s: float = 30.0
    """A worker that sends no heartbeat for this long (stopped, or stuck holding the GIL) is
    killed and replaced; 0: never."""
    request_timeout_s: float = 0.0
    """Deadline of every request (0: none); the ``timeout`` request parameter may shorten it."""
    worker_python: str = ""
    """The Python interpreter that runs workers (empty: the router's own). It needs Shoal's
    dependencies and the models' runtimes; the router needs neither runtime."""
    shm_arena_bytes: int = 64 << 20
    """Size of each segment of the router's input arena."""
    shm_arena_max_bytes: int = 1 << 30
    worker_arena_bytes: int = 16 << 20
    """Size of each segment of a worker's output arena."""
    inline_max_bytes: int = 32 << 10
    """Tensors up to this size travel inside the worker messages instead of shared memory."""
    model_load_timeout_s: float = 120.0
    allow_client_shm: bool = True
    """Clients may register system and CUDA shared-memory regions (Triton's extensions)."""
    allow_admin_api: bool = False
    """Operators may restart single workers (``POST /v2/admin/...``); listing is always on."""
    grpc_host: str = ""
    """gRPC bind address; empty: same as ``host``."""
    grpc: GrpcOptions = field(default_factory=lambda: GrpcOptions())


class ConfigError(Exception):
    """Every problem of a command line, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse(argv: list[str]) -> ServerConfig:
    """Parse ``shoal serve ...`` arguments; raises ``ConfigError`` listing every problem."""
    args = build_parser().parse_args(argv)
    problems: list[str] = []
    convert(args, problems)
    repos = args.model_repository or []
    if not repos:
        problems.append("--model-repository is required")
    elif len(repos) > 1:
        problems.append("only one --model-repository is supported")
    repo = Path(repos[0]) if repos else Path(".")
    remote = repos[0] if repos and is_remote(repos[0]) else ""
    if repos and not remote and not repo.is_dir():
        problems.append(f"--model-repository {repo}: not a directory")
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            problems.append(f"{flag} {port}: must be between 0 and 65535")
    nonzero = [p for p in ports.values() if p]
    if len(nonzero) != len(set(nonzero)):
        problems.append("--http-port, --grpc-port and --metrics-port must differ")
    seed_mode = "explicit" if args.allow_model_control else "poll" if args.allow_poll_model_repository else None
    if args.allow_model_control and args.allow_poll_model_repository:
        problems.append("--allow-model-control and --allow-poll-model-repository exclude each other")
    if args.model_control_mode is None:
        args.model_control_mode = seed_mode or "none"
    elif seed_mode is not None and str(args.model_control_mode).strip().lower() != seed_mode:
        problems.append(
            f"--model-control-mode {args.model_control_mode} conflicts with the seed's spelling of {seed_mode}"
        )
    args.model_control_mode = str(args.model_control_mode).strip().lower()
    if args.model_control_mode not in CONTROL_MODES:
        problems.append(f"--model-control-mode '{args.model_control_mode}': expected one of {', '.join(CONTROL_MODES)}")
    elif args.load_model and args.model_control_mode != "explicit":
        problems.append("--load-model needs --model-control-mode=explicit")
    if args.exit_timeout_secs < 0:
        problems.append("--exit-timeout-secs must be >= 0")
    if args.repository_poll_secs <= 0:
        problems.append("--repository-poll-secs must be > 0")
    if args.log_verbose < 0:
        problems.append("--log-verbose must be >= 0")
    if args.metrics_interval_ms <= 0:
        problems.append("--metrics-interval-ms must be > 0")
    for flag, value in (
        ("--http-max-input-size", args.http_max_input_size),
        ("--shm-arena-bytes", args.shm_arena_bytes),
        ("--worker-arena-bytes", args.worker_arena_bytes),
    ):
        if value <= 0:
            problems.append(f"{flag} must be > 0")
    for flag, value in (
        ("--http-max-body-size", args.http_max_body_size),
        ("--http-body-timeout-secs", args.http_body_timeout_secs),
        ("--http-keepalive-timeout-secs", args.http_keepalive_timeout_secs),
        ("--grpc-stream-max-pending", args.grpc_stream_max_pending),
        ("--client-shm-max-regions", args.client_shm_max_regions),
        ("--client-shm-max-regions-per-client", args.client_shm_max_regions_per_client),
    ):
        if value <= 0:
            problems.append(f"{flag} must be > 0")
    for flag, value in (
        ("--max-buffered-request-bytes", args.max_buffered_request_bytes),
        ("--http-max-connections", args.http_max_connections),
        ("--grpc-max-connections", args.grpc_max_connections),
        ("--max-worker-processes", args.max_worker_processes),
        ("--worker-heartbeat-timeout-secs", args.worker_heartbeat_timeout_secs),
        ("--request-timeout-secs", args.request_timeout_secs),
    ):
        if value < 0:
            problems.append(f"{flag} must be >= 0")
    args.client_shm_access = str(args.client_shm_access).strip().lower()
    if args.client_shm_access not in ("local", "any"):
        problems.append(f"--client-shm-access '{args.client_shm_access}': expected local or any")
    _, found = restrict.parse(args.http_restricted_api, flag="--http-restricted-api", what="api")
    problems += found
    _, found = restrict.parse(args.grpc_restricted_protocol, flag="--grpc-restricted-protocol", what="protocol")
    problems += found
    if args.inline_max_bytes < 0:
        problems.append("--inline-max-bytes must be >= 0")
    if args.model_load_timeout_secs <= 0:
        problems.append("--model-load-timeout-secs must be > 0")
    if args.shm_arena_max_bytes < args.shm_arena_bytes:
        problems.append("--shm-arena-max-bytes must be >= --shm-arena-bytes")
    if args.grpc_compression not in ("none", "low", "medium", "high"):
        problems.append(
            f"--grpc-infer-response-compression-level '{args.grpc_compression}': expected none, low, medium or high"
        )
    for attr, (_, flag) in TYPES.items():
        if (
            attr.startswith("grpc_")
            and attr != "grpc_port"
            and not isinstance(getattr(args, attr), bool)
            and getattr(args, attr) < 0
        ):
            problems.append(f"{flag} must be >= 0")
    if problems:
        raise ConfigError(problems)
    return ServerConfig(
        model_repository=repo.resolve() if not remote else Path(),
        model_repository_url=remote,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        allow_metrics=args.allow_metrics,
        allow_gpu_metrics=args.allow_gpu_metrics,
        allow_cpu_metrics=args.allow_cpu_metrics,
        metrics_interval_ms=args.metrics_interval_ms,
        exit_timeout_s=args.exit_timeout_secs,
        log_verbose=args.log_verbose,
        strict_model_config=args.strict_model_config,
        strict_readiness=args.strict_readiness,
        server_id=args.server_id,
        allow_client_shm=args.allow_client_shm,
        allow_admin_api=args.allow_admin_api,
        model_control_mode=args.model_control_mode,
        repository_poll_s=args.repository_poll_secs,
        load_models=tuple(args.load_model),
        disable_auto_complete=args.disable_auto_complete,
        http_max_input_bytes=args.http_max_input_size,
        shm_arena_bytes=args.shm_arena_bytes,
        shm_arena_max_bytes=args.shm_arena_max_bytes,
        worker_arena_bytes=args.worker_arena_bytes,
        inline_max_bytes=args.inline_max_bytes,
        model_load_timeout_s=args.model_load_timeout_secs,
        grpc_host=args.grpc_address,
        http_max_body_bytes=args.http_max_body_size,
        max_buffered_request_bytes=args.max_buffered_request_bytes,
        http_body_timeout_s=args.http_body_timeout_secs,
        http_keepalive_timeout_s=args.http_keepalive_timeout_secs,
        http_max_connections=args.http_max_connections,
        grpc_max_connections=args.grpc_max_connections,
        grpc_stream_max_pending=args.grpc_stream_max_pending,
        http_restricted_api=tuple(args.http_restricted_api),
        grpc_restricted_protocol=tuple(args.grpc_restricted_protocol),
        client_shm_access=args.client_shm_access,
        client_shm_key_prefixes=tuple(args.client_shm_key_prefix),
        client_shm_mapped=args.client_shm_mapped,
        client_shm_max_regions=args.client_shm_max_regions,
        client_shm_max_regions_per_client=args.client_shm_max_regions_per_client,
        max_worker_processes=args.max_worker_processes,
        worker_heartbeat_timeout_s=args.worker_heartbeat_timeout_secs,
        request_timeout_s=args.request_timeout_secs,
        worker_python=args.worker_python,
        grpc=GrpcOptions(
            keepalive_time_ms=args.grpc_keepalive_time,
            keepalive_timeout_ms=args.grpc_keepalive_timeout,
            keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
            http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
            http2_min_recv_ping_interval_without_data_ms=args.grpc_http2_min_recv_ping_interval_without_data,
            http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
            compression_level=args.grpc_compression,
        ),
    )
