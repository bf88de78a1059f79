"""Checks of the parsed command line that span several options: ports (each service its
own), the model control mode (with TRTIS's spellings) and the ranges of numeric options."""

from __future__ import annotations

import argparse

from shoal.server.flags import flag_of

CONTROL_MODES = ("none", "poll", "explicit")


def check_ports(args: argparse.Namespace, problems: list[str]) -> None:
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if args.http_health_port >= 0:
        ports["--http-health-port"] = args.http_health_port
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            problems.append(f"{flag} {port}: must be between 0 and 65535")
    used = {
        "--http-port": args.allow_http,
        "--grpc-port": args.allow_grpc,
        "--metrics-port": args.allow_metrics,
        "--http-health-port": True,
    }
    taken: dict[int, str] = {}
    for flag, port in ports.items():
        if not used[flag] or not port:
            continue
        if port in taken:
            problems.append(f"{taken[port]} and {flag} are both {port}: each service needs its own port")
        taken.setdefault(port, flag)


def check_control_mode(args: argparse.Namespace, problems: list[str]) -> None:
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
    if "*" in args.load_model and len(set(args.load_model)) > 1:
        problems.append("--load-model=* must be the only --load-model")


def check_ranges(args: argparse.Namespace, problems: list[str]) -> None:
    positive = (
        "exit_timeout_secs>=",
        "repository_poll_secs>",
        "log_verbose>=",
        "metrics_interval_ms>",
        "http_max_input_size>",
        "shm_arena_bytes>",
        "worker_arena_bytes>",
        "http_max_body_size>",
        "http_body_timeout_secs>",
        "http_keepalive_timeout_secs>",
        "grpc_stream_max_pending>",
        "client_shm_max_regions>",
        "client_shm_max_regions_per_client>",
        "max_buffered_request_bytes>=",
        "http_max_connections>=",
        "grpc_max_connections>=",
        "max_worker_processes>=",
        "worker_heartbeat_timeout_secs>=",
        "request_timeout_secs>=",
        "inline_max_bytes>=",
        "frontend_processes>=",
        "busy_poll_us>=",
        "model_load_timeout_secs>",
        "model_load_thread_count>",
        "model_load_retry_count>=",
        "grpc_infer_allocation_pool_size>=",
        "grpc_max_response_pool_size>=",
        "grpc_keepalive_time>=",
        "grpc_keepalive_timeout>=",
        "grpc_http2_max_pings_without_data>=",
        "grpc_http2_min_recv_ping_interval_without_data>=",
        "grpc_http2_max_ping_strikes>=",
        "grpc_max_connection_age>=",
        "grpc_max_connection_age_grace>=",
    )
    for rule in positive:
        dest, op = (rule[:-2], ">=") if rule.endswith(">=") else (rule[:-1], ">")
        value = getattr(args, dest)
        if (op == ">" and value <= 0) or (op == ">=" and value < 0):
            problems.append(f"{flag_of(dest)} must be {op} 0")
    if args.shm_arena_max_bytes < args.shm_arena_bytes:
        problems.append("--shm-arena-max-bytes must be >= --shm-arena-bytes")
