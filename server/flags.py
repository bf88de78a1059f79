"""The ``shoal serve`` / ``tritonserver`` command line: every option of tritonserver (its
spellings, groups and defaults), Shoal's own options, and the conversion of typed values.
``server.config`` validates the result into a ``ServerConfig``.

Each option is one ``Flag`` row. Options of tritonserver that mean nothing in Shoal are
``IGNORED``: accepted with their value checked, then named in one warning line at start."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


@dataclass(frozen=True, slots=True)
class Flag:
    names: tuple[str, ...]
    dest: str
    kind: type | None
    """bool, int, float or str; None: a switch without a value."""
    default: object
    help: str
    repeat: bool = False
    ignored: bool = False
    """tritonserver's option with no meaning here: accepted, checked, named in a warning."""
    metavar: str = ""


def _f(name: str | tuple[str, ...], kind: type | None, default: object, help: str, **kw: object) -> Flag:
    names = (name,) if isinstance(name, str) else name
    dest = kw.pop("dest", None) or names[0].lstrip("-").replace("-", "_")
    return Flag(names=names, dest=str(dest), kind=kind, default=default, help=help, **kw)  # type: ignore[arg-type]


def _ignored(name: str, kind: type, help: str, repeat: bool = False) -> Flag:
    return _f(name, kind, None, help, ignored=True, repeat=repeat)


# Triton's groups, in the order ``tritonserver --help`` prints them, then Shoal's own.
GROUPS: dict[str, list[Flag]] = {
    "Server": [
        _f("--id", str, "shoal", "the server's name in server metadata", dest="server_id"),
        _f("--exit-timeout-secs", float, 30.0, "seconds to let in-flight requests finish at shutdown"),
    ],
    "Logging": [
        _f("--log-verbose", int, 0, "verbose logging level (0: off; >0: debug)"),
        _f("--log-info", bool, True, "log INFO messages"),
        _f("--log-warning", bool, True, "log WARNING messages"),
        _f("--log-error", bool, True, "log ERROR messages"),
        _f("--log-format", str, "default", "default or ISO8601 (timestamps)"),
        _f("--log-file", str, "", "append the log to this file instead of stderr"),
    ],
    "Model Repository": [
        _f(
            ("--model-repository", "--model-store"),
            str,
            None,
            "model repository directory or s3:// gs:// URL (repeatable: several repositories)",
            repeat=True,
        ),
        _f("--exit-on-error", bool, False, "exit when a model fails to load at start (tritonserver: true)"),
        _f(
            "--disable-auto-complete-config",
            None,
            False,
            "no auto-complete: configs must be complete",
            dest="disable_auto_complete",
        ),
        _f("--strict-readiness", bool, True, "ready only when every model is ready (false: when the server is up)"),
        _f("--model-control-mode", str, None, "none (default), poll or explicit"),
        _f("--repository-poll-secs", float, 15.0, "seconds between polls of the repository (poll mode)"),
        _f("--load-model", str, None, "explicit mode: load this model at start (repeatable; * = all)", repeat=True),
        _f("--model-config-name", str, "", "read configs/<name>.pbtxt of each model where it exists"),
        _f("--model-load-thread-count", int, 4, "models loaded at once"),
        _f("--model-load-retry-count", int, 0, "times a failed load is retried"),
        _f("--model-namespacing", bool, False, "models of one name in several repositories are not served"),
        _ignored("--enable-peer-access", bool, "CUDA peer access (workers use it where the devices allow)"),
    ],
    "HTTP": [
        _f("--allow-http", bool, True, "serve HTTP"),
        _f(("--http-address", "--host"), str, "0.0.0.0", "HTTP bind address", dest="host"),
        _f("--http-port", int, 8000, "HTTP port; 0 picks a free port (the bound port is logged)"),
        _f("--reuse-http-port", bool, False, "SO_REUSEPORT on the HTTP port (several servers on one port)"),
        _f(
            "--http-header-forward-pattern",
            str,
            "",
            "HTTP headers matching this regex (case-insensitive) reach the model as request parameters",
        ),
        _ignored("--http-thread-count", int, "HTTP threads (one event loop serves HTTP)"),
        _f("--http-max-input-size", int, 64 << 20, "largest JSON part of a request (bytes)"),
        _f(
            "--http-restricted-api",
            str,
            None,
            "<apis>:<key>=<value>: these API groups need header <key> with <value> (repeatable)",
            repeat=True,
        ),
    ],
    "GRPC": [
        _f("--allow-grpc", bool, True, "serve gRPC"),
        _f("--grpc-address", str, "", "gRPC bind address (default: --http-address)"),
        _f("--grpc-port", int, 8001, "gRPC port; 0 picks a free port"),
        _f("--reuse-grpc-port", bool, False, "SO_REUSEPORT on the gRPC port"),
        _f(
            "--grpc-header-forward-pattern",
            str,
            "",
            "gRPC metadata keys matching this regex (case-insensitive) reach the model as request parameters",
        ),
        _ignored("--grpc-infer-thread-count", int, "gRPC threads (one event loop serves gRPC)"),
        _f(
            "--grpc-infer-allocation-pool-size",
            int,
            8,
            "accepted for compatibility: Shoal keeps no pool of request states",
        ),
        _f(
            "--grpc-max-response-pool-size",
            int,
            0,
            "accepted for compatibility: responses are not pooled (0: unlimited)",
        ),
        _f("--grpc-use-ssl", bool, False, "TLS on the gRPC port"),
        _f("--grpc-use-ssl-mutual", bool, False, "TLS with client certificates (implies --grpc-use-ssl)"),
        _f("--grpc-server-cert", str, "", "server certificate file (PEM)"),
        _f("--grpc-server-key", str, "", "server private key file (PEM)"),
        _f("--grpc-root-cert", str, "", "CA certificate file (PEM) that client certificates must chain to"),
        _f(
            "--grpc-infer-response-compression-level",
            str,
            "none",
            "none, low, medium or high (gzip)",
            dest="grpc_compression",
        ),
        _f("--grpc-keepalive-time", int, 7_200_000, "ms between keepalive pings"),
        _f("--grpc-keepalive-timeout", int, 20_000, "ms to wait for a keepalive ack"),
        _f("--grpc-keepalive-permit-without-calls", bool, False, "allow keepalive pings without calls"),
        _f("--grpc-http2-max-pings-without-data", int, 2, "pings without data before the peer must send"),
        _f(
            "--grpc-http2-min-recv-ping-interval-without-data",
            int,
            300_000,
            "ms that must pass between a client's pings without data",
        ),
        _f("--grpc-http2-max-ping-strikes", int, 2, "bad pings tolerated before the connection closes"),
        _f("--grpc-max-connection-age", int, 0, "ms a connection lives before it is asked to go away (0: forever)"),
        _f("--grpc-max-connection-age-grace", int, 0, "ms a connection past its age has to finish (0: forever)"),
        _f(
            "--grpc-restricted-protocol",
            str,
            None,
            "<protocols>:<key>=<value>: these groups need metadata triton-grpc-protocol-<key> (repeatable)",
            repeat=True,
        ),
    ],
    "Sagemaker": [
        _ignored("--allow-sagemaker", bool, "SageMaker endpoint (not served)"),
        _ignored("--sagemaker-port", int, "SageMaker port"),
        _ignored("--sagemaker-safe-port-range", str, "SageMaker port range"),
        _ignored("--sagemaker-thread-count", int, "SageMaker threads"),
    ],
    "Vertex": [
        _ignored("--allow-vertex-ai", bool, "Vertex AI endpoint (not served)"),
        _ignored("--vertex-ai-port", int, "Vertex AI port"),
        _ignored("--vertex-ai-thread-count", int, "Vertex AI threads"),
        _ignored("--vertex-ai-default-model", str, "Vertex AI default model"),
    ],
    "Metrics": [
        _f("--allow-metrics", bool, True, "serve Prometheus metrics"),
        _f("--allow-gpu-metrics", bool, True, "GPU metrics through NVML"),
        _f("--allow-cpu-metrics", bool, True, "CPU utilization and memory metrics"),
        _f("--metrics-address", str, "", "metrics bind address (default: --http-address)"),
        _f("--metrics-port", int, 8002, "Prometheus metrics at /metrics; 0 picks a free port"),
        _f("--metrics-interval-ms", float, 2000.0, "ms between samples of CPU and GPU metrics"),
        _f(
            "--metrics-config",
            str,
            None,
            "<key>=<value>: summary_latencies, summary_quantiles, counter_latencies (repeatable)",
            repeat=True,
        ),
    ],
    "Tracing": [
        _f(
            "--trace-config",
            str,
            None,
            "[<mode>,]<key>=<value>: level, rate, count, log-frequency, file, mode (repeatable)",
            repeat=True,
        ),
    ],
    "Backend": [
        _ignored("--backend-directory", str, "backend libraries (backends are Python modules here)"),
        _f(
            "--backend-config",
            str,
            None,
            "<backend>,<key>=<value> or default-max-batch-size=<n> (repeatable)",
            repeat=True,
        ),
    ],
    "Repository Agent": [
        _ignored("--repoagent-directory", str, "repository agent libraries (not supported)"),
    ],
    "Response Cache": [
        _f("--cache-config", str, None, "<cache>,<key>=<value>: local,size=<bytes> (repeatable)", repeat=True),
        _ignored("--cache-directory", str, "cache libraries (the local cache is built in)"),
    ],
    "Rate Limiter": [
        _f("--rate-limit", str, "off", "off or execution_count"),
        _f(
            "--rate-limit-resource",
            str,
            None,
            "<name>:<count>[:<device>]: resources the rate limiter has (repeatable)",
            repeat=True,
        ),
    ],
    "Memory/Device Management": [
        _ignored("--pinned-memory-pool-byte-size", int, "pinned memory pool (workers allocate their own)"),
        _ignored("--cuda-memory-pool-byte-size", str, "CUDA memory pool per device", repeat=True),
        _ignored("--cuda-virtual-address-size", str, "CUDA virtual address space per device", repeat=True),
        _ignored("--min-supported-compute-capability", float, "lowest GPU compute capability used"),
        _ignored("--buffer-manager-thread-count", int, "buffer manager threads"),
        _f(
            "--host-policy",
            str,
            None,
            "<policy>,<setting>=<value>: cpu-cores (0-3,8-8) or numa-node of the workers of instances "
            "with that policy (gpu_<id>, cpu, model, or instance_group.host_policy) (repeatable)",
            repeat=True,
        ),
        _f(
            "--model-load-gpu-limit",
            str,
            None,
            "<device_id>:<fraction>: a GPU instance whose load leaves more than that fraction of the "
            "GPU's memory in use fails to load (repeatable)",
            repeat=True,
        ),
    ],
    "Shared Memory": [
        _f("--allow-client-shm", bool, True, "clients may register system and CUDA shared memory (false: 501)"),
    ],
    "DEPRECATED": [
        _f("--strict-model-config", bool, None, "true: no auto-complete (use --disable-auto-complete-config)"),
        _f("--response-cache-byte-size", int, None, "use --cache-config local,size=<bytes>"),
        _f("--trace-file", str, None, "use --trace-config triton,file=<path>"),
        _f("--trace-level", str, None, "use --trace-config level=<OFF|TIMESTAMPS|TENSORS>", repeat=True),
        _f("--trace-rate", int, None, "use --trace-config rate=<n>"),
        _f("--trace-count", int, None, "use --trace-config count=<n>"),
        _f("--trace-log-frequency", int, None, "use --trace-config triton,log-frequency=<n>"),
        # TRTIS 19.08's spellings of the control modes
        _f("--allow-model-control", bool, None, "TRTIS: true is --model-control-mode=explicit"),
        _f("--allow-poll-model-repository", bool, None, "TRTIS: true is --model-control-mode=poll"),
    ],
    "Shoal": [
        _f(
            "--http-health-port",
            int,
            -1,
            "serve the health endpoints alone on this port too (TRTIS; -1: off, 0: a free port)",
        ),
        _f("--allow-admin-api", bool, False, "let operators restart single workers over HTTP"),
        _f("--http-max-body-size", int, 2 << 30, "largest inference request body, inflated size (bytes)"),
        _f(
            "--max-buffered-request-bytes",
            int,
            0,
            "request bytes held at once, HTTP and gRPC (0: half the memory)",
        ),
        _f("--http-body-timeout-secs", float, 60.0, "408 when a request body stalls this long"),
        _f("--http-keepalive-timeout-secs", float, 75.0, "close idle HTTP connections after this"),
        _f("--http-max-connections", int, 0, "open HTTP connections (0: from the fd limit)"),
        _f("--grpc-max-connections", int, 0, "open gRPC connections (0: from the fd limit)"),
        _f("--grpc-stream-max-pending", int, 256, "unread responses per gRPC stream before reading pauses"),
        _f(
            "--client-shm-access",
            str,
            "local",
            "local (clients on this host, own objects, own regions) or any (as Triton)",
        ),
        _f(
            "--client-shm-key-prefix",
            str,
            None,
            "only shared memory keys starting with this may be registered (repeatable)",
            repeat=True,
        ),
        _f(
            "--client-shm-mapped",
            bool,
            False,
            "workers use client regions in place (faster; a client truncating its object can crash a worker)",
        ),
        _f("--client-shm-max-regions", int, 4096, "registered regions at most"),
        _f("--client-shm-max-regions-per-client", int, 1024, "registered regions per client at most"),
        _f("--max-worker-processes", int, 0, "model instances at most (0: 16 per CPU, >= 64)"),
        _f("--worker-heartbeat-timeout-secs", float, 30.0, "kill and replace a silent worker after this (0: off)"),
        _f("--request-timeout-secs", float, 0.0, "deadline of every request (0: none)"),
        _f("--worker-python", str, "", "Python interpreter that runs workers (default: this one)"),
        _f(
            "--frontend-processes",
            int,
            0,
            "serve HTTP and gRPC from this many processes beside the router (0: the router serves them)",
        ),
        _f(
            "--frontend-lanes",
            bool,
            True,
            "frontend processes and models' BLS calls send requests straight to the workers of models"
            " that need no scheduling by the router (false: everything through the router)",
        ),
        _f(
            "--busy-poll-us",
            int,
            0,
            "after each request and answer, the router, frontend processes and single-threaded workers poll"
            " their sockets this many microseconds before sleeping (lower latency at low load, for a core each"
            " while requests keep coming; 0: off)",
        ),
        _f("--shm-arena-bytes", int, 64 << 20, "size of each segment of the router's input arena"),
        _f("--shm-arena-max-bytes", int, 1 << 30, "the router's input arena at most"),
        _f("--worker-arena-bytes", int, 16 << 20, "size of each segment of a worker's output arena"),
        _f("--inline-max-bytes", int, 32 << 10, "tensors up to this size travel inside worker messages"),
        _f("--model-load-timeout-secs", float, 120.0, "a model that takes longer to load fails"),
    ],
}

FLAGS: tuple[Flag, ...] = tuple(f for group in GROUPS.values() for f in group)
TRITON_DEFAULTS = {"server_id": "triton", "exit_on_error": True}
"""Where ``tritonserver`` (the drop-in executable) starts from Triton's defaults."""


def flag_of(dest: str) -> str:
    return next(f.names[0] for f in FLAGS if f.dest == dest)


def convert(args: argparse.Namespace, problems: list[str]) -> None:
    """Convert typed options in place, collecting every malformed value (argparse would
    stop at the first)."""
    expected = {bool: "true or false", int: "an integer", float: "a number"}
    for f in FLAGS:
        if f.kind in (None, str):
            continue
        value = getattr(args, f.dest)
        values = value if isinstance(value, list) else [value]
        out: list[object] = []
        for v in values:
            if not isinstance(v, str):
                out.append(v)
                continue
            try:
                out.append(_bool(v) if f.kind is bool else f.kind(v))
            except (ValueError, argparse.ArgumentTypeError):
                problems.append(f"{f.names[0]} '{v}': expected {expected[f.kind]}")
                out.append(False if f.kind is bool else 0)
        setattr(args, f.dest, out if isinstance(value, list) else out[0])


def ignored_given(args: argparse.Namespace) -> list[str]:
    """The options given that mean nothing here (for the warning at start)."""
    return [f.names[0] for f in FLAGS if f.ignored and getattr(args, f.dest) not in (None, [])]


def _help(f: Flag, default: object) -> str:
    if f.ignored:
        return f"{f.help}; accepted, no effect in Shoal"
    if f.kind is None or default in (None, ""):
        return f.help
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{f.help} (default: {shown})"


def add_serve_options(p: argparse.ArgumentParser, *, triton: bool = False) -> None:
    for title, flags in GROUPS.items():
        group = p.add_argument_group(title)
        for f in flags:
            default = TRITON_DEFAULTS.get(f.dest, f.default) if triton else f.default
            kw: dict[str, object] = {"dest": f.dest, "help": _help(f, default)}
            if f.kind is None:
                group.add_argument(*f.names, action="store_true", **kw)  # type: ignore[arg-type, unused-ignore]
                continue
            if f.repeat:
                kw["action"] = "append"
                kw["default"] = []
            else:
                kw["default"] = default
            kw["metavar"] = f.metavar or {bool: "BOOL", int: "INT", float: "NUM"}.get(f.kind, "STR")
            group.add_argument(*f.names, **kw)  # type: ignore[arg-type, unused-ignore]


def _wide(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=44, width=120)


def build_parser(*, triton: bool = False) -> argparse.ArgumentParser:
    """``shoal serve ...``; ``triton``: the parser of the ``tritonserver`` executable (no
    subcommand, Triton's defaults for ``--id`` and ``--exit-on-error``)."""
    if triton:
        p = argparse.ArgumentParser(
            prog="tritonserver",
            description="Shoal, started as tritonserver: Triton's command line and defaults",
            allow_abbrev=False,
            formatter_class=_wide,
        )
        add_serve_options(p, triton=True)
        p.set_defaults(command="serve")
        return p
    p = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a Triton-compatible inference server in Python",
        epilog="'shoal COMMAND --help' describes each command.",
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve", help="serve a model repository over HTTP and gRPC", allow_abbrev=False, formatter_class=_wide
    )
    add_serve_options(s)
    # listed for --help: ``server.__main__`` hands ``shoal workers ...`` to ``server.admincli``
    sub.add_parser(
        "workers",
        help="a running server's worker processes: list them, restart one, show one's recent output",
        add_help=False,
    )
    return p
