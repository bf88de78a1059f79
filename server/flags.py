"""The ``shoal serve`` command line: every flag, its default and its help text (Triton's
spellings where Triton has the flag), and the conversion of typed values. ``server.config``
validates the result into a ``ServerConfig``."""

from __future__ import annotations

import argparse


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


TYPES: dict[str, tuple[type, str]] = {
    "http_port": (int, "--http-port"),
    "grpc_port": (int, "--grpc-port"),
    "metrics_port": (int, "--metrics-port"),
    "allow_metrics": (bool, "--allow-metrics"),
    "allow_gpu_metrics": (bool, "--allow-gpu-metrics"),
    "allow_cpu_metrics": (bool, "--allow-cpu-metrics"),
    "metrics_interval_ms": (int, "--metrics-interval-ms"),
    "exit_timeout_secs": (float, "--exit-timeout-secs"),
    "log_verbose": (int, "--log-verbose"),
    "strict_model_config": (bool, "--strict-model-config"),
    "strict_readiness": (bool, "--strict-readiness"),
    "allow_client_shm": (bool, "--allow-client-shm"),
    "allow_admin_api": (bool, "--allow-admin-api"),
    "allow_model_control": (bool, "--allow-model-control"),
    "allow_poll_model_repository": (bool, "--allow-poll-model-repository"),
    "repository_poll_secs": (float, "--repository-poll-secs"),
    "http_max_input_size": (int, "--http-max-input-size"),
    "shm_arena_bytes": (int, "--shm-arena-bytes"),
    "shm_arena_max_bytes": (int, "--shm-arena-max-bytes"),
    "worker_arena_bytes": (int, "--worker-arena-bytes"),
    "inline_max_bytes": (int, "--inline-max-bytes"),
    "model_load_timeout_secs": (float, "--model-load-timeout-secs"),
    "grpc_keepalive_time": (int, "--grpc-keepalive-time"),
    "grpc_keepalive_timeout": (int, "--grpc-keepalive-timeout"),
    "grpc_keepalive_permit_without_calls": (bool, "--grpc-keepalive-permit-without-calls"),
    "grpc_http2_max_pings_without_data": (int, "--grpc-http2-max-pings-without-data"),
    "grpc_http2_min_recv_ping_interval_without_data": (int, "--grpc-http2-min-recv-ping-interval-without-data"),
    "grpc_http2_max_ping_strikes": (int, "--grpc-http2-max-ping-strikes"),
    "http_max_body_size": (int, "--http-max-body-size"),
    "max_buffered_request_bytes": (int, "--max-buffered-request-bytes"),
    "http_body_timeout_secs": (float, "--http-body-timeout-secs"),
    "http_keepalive_timeout_secs": (float, "--http-keepalive-timeout-secs"),
    "http_max_connections": (int, "--http-max-connections"),
    "grpc_max_connections": (int, "--grpc-max-connections"),
    "grpc_stream_max_pending": (int, "--grpc-stream-max-pending"),
    "client_shm_max_regions": (int, "--client-shm-max-regions"),
    "client_shm_mapped": (bool, "--client-shm-mapped"),
    "client_shm_max_regions_per_client": (int, "--client-shm-max-regions-per-client"),
    "max_worker_processes": (int, "--max-worker-processes"),
    "worker_heartbeat_timeout_secs": (float, "--worker-heartbeat-timeout-secs"),
    "request_timeout_secs": (float, "--request-timeout-secs"),
}


def convert(args: argparse.Namespace, problems: list[str]) -> None:
    """Convert typed options in place, collecting every malformed value (argparse would
    stop at the first)."""
    for attr, (kind, flag) in TYPES.items():
        value = getattr(args, attr)
        if not isinstance(value, str):
            continue
        try:
            converted: object = _bool(value) if kind is bool else kind(value)
        except (ValueError, argparse.ArgumentTypeError):
            expected = {bool: "true or false", int: "an integer"}.get(kind, "a number")
            problems.append(f"{flag} '{value}': expected {expected}")
            converted = 0 if kind is not bool else True
        setattr(args, attr, converted)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="Shoal: a Triton-compatible inference server in Python")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository over HTTP")
    s.add_argument(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        action="append",
        help="model repository directory (Triton layout)",
    )
    s.add_argument("--host", "--http-address", dest="host", default="0.0.0.0")
    s.add_argument("--http-port", default=8000, help="0 picks a free port; the bound port is logged")
    s.add_argument("--grpc-port", default=8001)
    s.add_argument("--metrics-port", default=8002, help="Prometheus metrics at /metrics; 0 picks a free port")
    s.add_argument("--allow-metrics", default=True, help="serve Prometheus metrics (default true)")
    s.add_argument("--allow-gpu-metrics", default=True, help="GPU metrics through NVML (default true)")
    s.add_argument("--allow-cpu-metrics", default=True, help="CPU utilization and memory metrics (default true)")
    s.add_argument("--metrics-interval-ms", default=2000, help="how often CPU/GPU metrics are sampled")
    s.add_argument("--exit-timeout-secs", default=30.0, help="seconds to let in-flight requests finish at shutdown")
    s.add_argument("--log-verbose", default=0)
    s.add_argument("--strict-model-config", default=False, help="true: no auto-complete (configs must be complete)")
    s.add_argument(
        "--disable-auto-complete-config", dest="disable_auto_complete", action="store_true", help="no auto-complete"
    )
    s.add_argument("--strict-readiness", default=True)
    s.add_argument("--id", dest="server_id", default="shoal", help="the server's name in server metadata")
    s.add_argument(
        "--allow-client-shm",
        default=True,
        help="let clients register system/CUDA shared memory (default true; false answers 501)",
    )
    s.add_argument(
        "--allow-admin-api", default=False, help="let operators restart single workers over HTTP (default false)"
    )
    s.add_argument("--model-control-mode", default=None, help="none (default), poll or explicit")
    # the seed's (TRTIS 19.08) spellings: --allow-model-control=true is explicit mode,
    # --allow-poll-model-repository=true poll mode
    s.add_argument("--allow-model-control", default=None)
    s.add_argument("--allow-poll-model-repository", default=None)
    s.add_argument("--repository-poll-secs", default=15.0)
    s.add_argument(
        "--load-model", dest="load_model", action="append", default=[], help="explicit mode: load at start (* = all)"
    )
    s.add_argument("--http-max-input-size", default=64 << 20, help="largest JSON part of a request (bytes)")
    s.add_argument(
        "--http-max-body-size", default=2 << 30, help="largest inference request body, inflated size (bytes)"
    )
    s.add_argument(
        "--max-buffered-request-bytes", default=0, help="request bytes held at once, HTTP and gRPC (0: half the memory)"
    )
    s.add_argument("--http-body-timeout-secs", default=60.0, help="408 when a request body stalls this long")
    s.add_argument("--http-keepalive-timeout-secs", default=75.0, help="close idle HTTP connections after this")
    s.add_argument("--http-max-connections", default=0, help="open HTTP connections (0: from the fd limit)")
    s.add_argument("--grpc-max-connections", default=0, help="open gRPC connections (0: from the fd limit)")
    s.add_argument(
        "--grpc-stream-max-pending", default=256, help="unread responses per gRPC stream before reading pauses"
    )
    s.add_argument(
        "--http-restricted-api",
        action="append",
        default=[],
        help="<apis>:<key>=<value>: these API groups need header <key> with <value> (repeatable)",
    )
    s.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=[],
        help="<protocols>:<key>=<value>: these groups need metadata triton-grpc-protocol-<key> (repeatable)",
    )
    s.add_argument(
        "--client-shm-access",
        default="local",
        help="local (default: clients on this host, own objects, own regions) or any (as Triton)",
    )
    s.add_argument(
        "--client-shm-key-prefix",
        dest="client_shm_key_prefix",
        action="append",
        default=[],
        help="only shared memory keys starting with this may be registered (repeatable)",
    )
    s.add_argument(
        "--client-shm-mapped",
        default=False,
        help="workers use client regions in place (faster; a client truncating its object can crash a worker)",
    )
    s.add_argument("--client-shm-max-regions", default=4096)
    s.add_argument("--client-shm-max-regions-per-client", default=1024)
    s.add_argument("--max-worker-processes", default=0, help="model instances at most (0: 16 per CPU, >= 64)")
    s.add_argument(
        "--worker-heartbeat-timeout-secs", default=30.0, help="kill and replace a silent worker after this (0: off)"
    )
    s.add_argument("--request-timeout-secs", default=0.0, help="deadline of every request (0: none)")
    s.add_argument("--worker-python", default="", help="Python interpreter that runs workers (default: this one)")
    s.add_argument("--shm-arena-bytes", default=64 << 20)
    s.add_argument("--shm-arena-max-bytes", default=1 << 30)
    s.add_argument("--worker-arena-bytes", default=16 << 20)
    s.add_argument("--inline-max-bytes", default=32 << 10)
    s.add_argument("--model-load-timeout-secs", default=120.0)
    s.add_argument("--grpc-address", dest="grpc_address", default="", help="gRPC bind address (default: --host)")
    s.add_argument("--grpc-keepalive-time", default=7_200_000, help="ms between keepalive pings")
    s.add_argument("--grpc-keepalive-timeout", default=20_000, help="ms to wait for a keepalive ack")
    s.add_argument("--grpc-keepalive-permit-without-calls", default=False)
    s.add_argument("--grpc-http2-max-pings-without-data", default=2)
    s.add_argument("--grpc-http2-min-recv-ping-interval-without-data", default=300_000)
    s.add_argument("--grpc-http2-max-ping-strikes", default=2)
    s.add_argument(
        "--grpc-infer-response-compression-level",
        dest="grpc_compression",
        default="none",
        help="none, low, medium or high (gzip)",
    )
    return p
