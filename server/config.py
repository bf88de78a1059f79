"""``ServerConfig``: the command line, parsed and validated in one place.

All errors are collected and reported together. Nothing else in the router reads the
environment or the command line.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from shoal.server import flagchecks, latencymetrics, optionvalues, restrict
from shoal.server.cloudrepo import is_remote
from shoal.server.flags import build_parser, convert, ignored_given
from shoal.server.latencymetrics import LatencyConfig
from shoal.server.optionvalues import RateLimitResource


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """gRPC over TLS (``--grpc-use-ssl``); ``mutual``: clients must present a certificate
    that chains to ``root_cert``."""

    server_cert: str
    server_key: str
    root_cert: str = ""
    mutual: bool = False


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
    max_connection_age_ms: int = 0
    max_connection_age_grace_ms: int = 0
    reuse_port: bool = False
    header_forward_pattern: str = ""
    """Metadata keys matching this (case-insensitive) become request parameters."""
    tls: TlsOptions | None = None


@dataclass(frozen=True, slots=True)
class LogOptions:
    """Triton's logging flags; ``server.logsettings`` applies them."""

    verbose: int = 0
    info: bool = True
    warning: bool = True
    error: bool = True
    format: str = "default"
    file: str = ""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model_repository: Path
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    allow_http: bool = True
    allow_grpc: bool = True
    http_health_port: int = -1
    """TRTIS's health port: the health endpoints alone, on a port of their own (-1: none)."""
    reuse_http_port: bool = False
    allow_metrics: bool = True
    metrics_address: str = ""
    """Metrics bind address; empty: ``host``."""
    latency_metrics: LatencyConfig = field(default_factory=lambda: LatencyConfig())
    """``--metrics-config``: latency summaries, histograms, counters."""
    allow_gpu_metrics: bool = True
    allow_cpu_metrics: bool = True
    metrics_interval_ms: float = 2000.0
    """How often CPU and GPU metrics are sampled."""
    exit_timeout_s: float = 30.0
    exit_on_error: bool = False
    """A model that fails to load at start stops the server (exit status 1); tritonserver's
    default is true, ``shoal serve``'s false (serve what loaded, report the rest)."""
    log: LogOptions = field(default_factory=lambda: LogOptions())
    strict_model_config: bool = False
    disable_auto_complete: bool = False
    strict_readiness: bool = True
    server_id: str = "shoal"
    """The name server metadata reports (``--id``; Triton's default is "triton")."""
    model_control_mode: str = "none"
    repository_poll_s: float = 15.0
    more_repositories: tuple[Path, ...] = ()
    """Further ``--model-repository`` directories (a model name must be unique across all)."""
    model_repository_url: str = ""
    """An object-storage repository (``s3://...``, ``gs://...``); ``model_repository`` is
    then the local copy the server makes."""
    load_models: tuple[str, ...] = ()
    """Models to load at start in explicit mode (``*``: all)."""
    model_config_name: str = ""
    """Read ``configs/<name>.pbtxt`` of a model instead of ``config.pbtxt`` where it exists."""
    model_load_thread_count: int = 4
    model_load_retry_count: int = 0
    model_namespacing: bool = False
    backend_config: tuple[tuple[str, str, str], ...] = ()
    """``--backend-config`` settings as (backend, key, value); backend "" is global."""
    host_policies: tuple[tuple[str, str, str], ...] = ()
    """``--host-policy`` settings as (policy name, setting, value)."""
    gpu_load_limits: tuple[tuple[int, float], ...] = ()
    """``--model-load-gpu-limit`` as (device id, fraction of its memory)."""
    cache_bytes: int = 0
    """Size of the local response cache (0: no cache)."""
    trace_config: tuple[tuple[str, str, str], ...] = ()
    rate_limit: str = "off"
    rate_limit_resources: tuple[RateLimitResource, ...] = ()
    http_header_forward_pattern: str = ""
    """HTTP headers matching this (case-insensitive) become request parameters."""
    warnings: tuple[str, ...] = ()
    """Deprecated and ignored options given: logged once at start."""
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
    frontend_processes: int = 0
    """Processes that serve the HTTP and gRPC ports beside the router (``server.frontproc``);
    0: the router serves them itself."""
    frontend_lanes: bool = True
    """Frontend processes and workers' BLS calls send requests of models that need no
    scheduling by the router straight to a worker, which batches them itself where the model
    batches (``server.frontproc.lanes``, ``workers.lanecalls``, ``workers.lanebatch``)."""
    busy_poll_us: int = 0
    """Microseconds the event loops and workers poll without sleeping after traffic
    (``server.busypoll``, ``workers.inbox``); 0: off."""
    argv: tuple[str, ...] = field(default=(), compare=False)
    """The command line this was parsed from (frontend processes parse it again)."""
    triton: bool = field(default=False, compare=False)
    """Started as ``tritonserver`` (with Triton's defaults, which the other fields hold)."""
    grpc: GrpcOptions = field(default_factory=lambda: GrpcOptions())


class ConfigError(Exception):
    """Every problem of a command line, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def bare_host(address: str) -> str:
    """A bind address as sockets take it: an IPv6 address without the brackets of its
    ``[::1]`` form (both forms are accepted for ``--http-address``, ``--grpc-address`` and
    ``--metrics-address``)."""
    if address.startswith("[") and address.endswith("]"):
        return address[1:-1]
    return address


def parse(argv: list[str], *, triton: bool = False) -> ServerConfig:
    """Parse ``shoal serve ...`` arguments (``triton``: the ``tritonserver`` executable's,
    without the subcommand); raises ``ConfigError`` listing every problem."""
    args = build_parser(triton=triton).parse_args(argv)
    problems: list[str] = []
    notes: list[str] = []
    convert(args, problems)
    repos = args.model_repository or []
    if not repos:
        problems.append("--model-repository is required")
    remote = [r for r in repos if is_remote(r)]
    if remote and len(repos) > 1:
        problems.append("an object-storage --model-repository cannot be combined with other repositories")
    for r in repos:
        if not is_remote(r) and not Path(r).is_dir():
            problems.append(f"--model-repository {r}: not a directory")
    local = list(dict.fromkeys(Path(r).resolve() for r in repos if not is_remote(r)))
    flagchecks.check_ports(args, problems)
    flagchecks.check_control_mode(args, problems)
    flagchecks.check_ranges(args, problems)
    args.client_shm_access = str(args.client_shm_access).strip().lower()
    if args.client_shm_access not in ("local", "any"):
        problems.append(f"--client-shm-access '{args.client_shm_access}': expected local or any")
    _, found = restrict.parse(args.http_restricted_api, flag="--http-restricted-api", what="api")
    problems += found
    _, found = restrict.parse(args.grpc_restricted_protocol, flag="--grpc-restricted-protocol", what="protocol")
    problems += found
    if args.grpc_compression not in ("none", "low", "medium", "high"):
        problems.append(
            f"--grpc-infer-response-compression-level '{args.grpc_compression}': expected none, low, medium or high"
        )
    if args.log_format not in ("default", "ISO8601"):
        problems.append(f"--log-format '{args.log_format}': expected default or ISO8601")
    for flag, pattern in (
        ("--http-header-forward-pattern", args.http_header_forward_pattern),
        ("--grpc-header-forward-pattern", args.grpc_header_forward_pattern),
    ):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{flag} '{pattern}': not a regular expression ({exc})")
    if " " in args.model_config_name:
        problems.append("--model-config-name must not contain spaces")
    tls = _tls(args, problems)
    backend = optionvalues.backend_config(args, problems)
    host_policies = optionvalues.host_policies(args, problems)
    gpu_load_limits = optionvalues.gpu_load_limits(args, problems)
    cache_bytes = optionvalues.cache_config(args, problems, notes)
    trace = optionvalues.trace_config(args, problems, notes)
    metrics_config = optionvalues.metrics_config(args, problems)
    latency = latencymetrics.parse(metrics_config, problems)
    if str(args.rate_limit).lower() not in ("off", "execution_count"):
        problems.append(f"--rate-limit '{args.rate_limit}': expected off or execution_count")
    resources = tuple(
        r for r in (optionvalues.rate_limit_resource(t, problems) for t in args.rate_limit_resource) if r is not None
    )
    if args.strict_model_config is not None:
        notes.append("--strict-model-config is deprecated: use --disable-auto-complete-config")
    if args.allow_sagemaker or args.allow_vertex_ai:
        problems.append("--allow-sagemaker and --allow-vertex-ai: Shoal serves no SageMaker or Vertex AI endpoint")
    ignored = ignored_given(args)
    if ignored:
        notes.append(f"ignored (no meaning in Shoal): {', '.join(ignored)}")
    if problems:
        raise ConfigError(problems)
    return ServerConfig(
        model_repository=local[0] if local else Path(),
        more_repositories=tuple(local[1:]),
        model_repository_url=remote[0] if remote else "",
        host=bare_host(args.host),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        allow_http=args.allow_http,
        allow_grpc=args.allow_grpc,
        allow_metrics=args.allow_metrics,
        allow_gpu_metrics=args.allow_gpu_metrics and args.allow_metrics,
        allow_cpu_metrics=args.allow_cpu_metrics and args.allow_metrics,
        metrics_address=bare_host(args.metrics_address),
        metrics_interval_ms=args.metrics_interval_ms,
        latency_metrics=latency,
        http_health_port=args.http_health_port,
        reuse_http_port=args.reuse_http_port,
        exit_timeout_s=args.exit_timeout_secs,
        exit_on_error=args.exit_on_error,
        log=LogOptions(
            verbose=args.log_verbose,
            info=args.log_info,
            warning=args.log_warning,
            error=args.log_error,
            format=args.log_format,
            file=args.log_file,
        ),
        strict_model_config=bool(args.strict_model_config),
        strict_readiness=args.strict_readiness,
        server_id=args.server_id,
        allow_client_shm=args.allow_client_shm,
        allow_admin_api=args.allow_admin_api,
        model_control_mode=args.model_control_mode,
        repository_poll_s=args.repository_poll_secs,
        load_models=tuple(args.load_model),
        disable_auto_complete=args.disable_auto_complete,
        model_config_name=args.model_config_name,
        model_load_thread_count=args.model_load_thread_count,
        model_load_retry_count=args.model_load_retry_count,
        model_namespacing=args.model_namespacing,
        backend_config=backend,
        host_policies=host_policies,
        gpu_load_limits=gpu_load_limits,
        cache_bytes=cache_bytes,
        trace_config=trace,
        rate_limit=str(args.rate_limit).lower(),
        rate_limit_resources=resources,
        http_max_input_bytes=args.http_max_input_size,
        http_header_forward_pattern=args.http_header_forward_pattern,
        shm_arena_bytes=args.shm_arena_bytes,
        shm_arena_max_bytes=args.shm_arena_max_bytes,
        worker_arena_bytes=args.worker_arena_bytes,
        inline_max_bytes=args.inline_max_bytes,
        model_load_timeout_s=args.model_load_timeout_secs,
        grpc_host=bare_host(args.grpc_address),
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
        frontend_processes=args.frontend_processes,
        frontend_lanes=args.frontend_lanes,
        busy_poll_us=args.busy_poll_us,
        argv=tuple(argv),
        triton=triton,
        grpc=GrpcOptions(
            keepalive_time_ms=args.grpc_keepalive_time,
            keepalive_timeout_ms=args.grpc_keepalive_timeout,
            keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
            http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
            http2_min_recv_ping_interval_without_data_ms=args.grpc_http2_min_recv_ping_interval_without_data,
            http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
            compression_level=args.grpc_compression,
            max_connection_age_ms=args.grpc_max_connection_age,
            max_connection_age_grace_ms=args.grpc_max_connection_age_grace,
            reuse_port=args.reuse_grpc_port,
            header_forward_pattern=args.grpc_header_forward_pattern,
            tls=tls,
        ),
        warnings=tuple(notes),
    )


def _tls(args: argparse.Namespace, problems: list[str]) -> TlsOptions | None:
    if not (args.grpc_use_ssl or args.grpc_use_ssl_mutual):
        return None
    files = {"--grpc-server-cert": args.grpc_server_cert, "--grpc-server-key": args.grpc_server_key}
    if args.grpc_use_ssl_mutual:
        files["--grpc-root-cert"] = args.grpc_root_cert
    for flag, path in files.items():
        if not path:
            problems.append(f"--grpc-use-ssl{'-mutual' if args.grpc_use_ssl_mutual else ''} needs {flag}")
        elif not Path(path).is_file():
            problems.append(f"{flag} {path}: no such file")
    return TlsOptions(
        server_cert=args.grpc_server_cert,
        server_key=args.grpc_server_key,
        root_cert=args.grpc_root_cert,
        mutual=args.grpc_use_ssl_mutual,
    )
