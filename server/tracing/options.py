"""Trace options: Triton's ``--trace-config`` keys, levels and modes, read and checked."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger("shoal.trace")

TIMESTAMPS = 0x4
TENSORS = 0x8
"""Level bits (Triton's TRITONSERVER_TRACE_LEVEL_TIMESTAMPS / _TENSORS); 0 is OFF."""
TRITON = "triton"
OPENTELEMETRY = "opentelemetry"
MODES = (TRITON, OPENTELEMETRY)
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
OTEL_DEFAULT_URL = "http://localhost:4318/v1/traces"
OTEL_BSP = (
    ("bsp_max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE", "2048"),
    ("bsp_schedule_delay", "OTEL_BSP_SCHEDULE_DELAY", "5000"),
    ("bsp_max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
)
OTEL_MISSING = (
    "--trace-config mode=opentelemetry needs the OpenTelemetry SDK and its OTLP/HTTP exporter: "
    "pip install 'shoal[trace]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)"
)
FRONTEND_STAMPS = frozenset(
    {
        "HTTP_RECV_START",
        "HTTP_RECV_END",
        "HTTP_SEND_START",
        "HTTP_SEND_END",
        "GRPC_WAITREAD_START",
        "GRPC_WAITREAD_END",
        "GRPC_SEND_START",
        "GRPC_SEND_END",
        "INFER_RESPONSE_COMPLETE",
    }
)
"""Stamps of the frontend (Triton records them on the trace's root span in OpenTelemetry)."""
FILE_NOT_UPDATABLE = "trace file location can not be updated through network protocol"
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class TraceConfigError(ValueError):
    """A ``--trace-config`` setting Triton refuses (its wording)."""


# ---- start options --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceOptions:
    """The server's trace settings at start (Triton's global default)."""

    level: int = 0
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0
    file: str = ""
    mode: str = TRITON
    extra: tuple[tuple[str, str], ...] = ()
    """The mode's other settings as given (opentelemetry: url, resource, bsp_*; reported
    by the settings APIs as Triton reports them)."""

    def option(self, key: str, default: str = "") -> str:
        value = default
        for k, v in self.extra:
            if k == key:
                value = v
        return value


def _level_value(text: str) -> int:
    low = text.strip().lower()
    if low in ("false", "off"):
        return 0
    if low in ("true", "on", "min", "max", "timestamps"):
        return TIMESTAMPS
    if low == "tensors":
        return TENSORS
    raise TraceConfigError(f"invalid value for trace level option: {low}")


def _int_option(text: str, low: int = -(2**31), high: int = INT32_MAX) -> int:
    if not _INTEGER.fullmatch(text):
        raise TraceConfigError(f"Invalid option value. Got {text}")
    value = int(text)
    if not low <= value <= high:
        raise TraceConfigError(f"Invalid option value. Got {text} (out of range [{low}, {high}])")
    return value


def parse_options(settings: Iterable[tuple[str, str, str]], environ: Mapping[str, str] | None = None) -> TraceOptions:
    """``ServerConfig.trace_config`` ((mode, key, value); mode "" for the global keys level,
    rate, count, mode) as Triton reads them: levels combine and any OFF turns tracing off,
    otherwise the last value wins. Raises ``TraceConfigError``."""
    env = os.environ if environ is None else environ
    level = 0
    off = False
    rate, count, log_frequency, file, mode = 1000, -1, 0, "", TRITON
    by_mode: dict[str, list[tuple[str, str]]] = {TRITON: [], OPENTELEMETRY: []}
    for group, key, value in settings:
        if not group:
            where = f'Bad option: "--trace-config {key}".\n'
            try:
                if key == "level":
                    bits = _level_value(value)
                    off |= bits == 0
                    level |= bits
                elif key == "rate":
                    rate = _int_option(value, 0)
                elif key == "count":
                    count = _int_option(value, -1)
                elif key == "mode":
                    mode = _mode(value)
                else:
                    log.warning("--trace-config %s=%s: unknown global trace setting, ignored", key, value)
            except TraceConfigError as exc:
                raise TraceConfigError(where + str(exc)) from None
            continue
        by_mode[_mode(group)].append((key, value))
    extra: list[tuple[str, str]] = []
    if mode == TRITON:
        for key, value in by_mode[TRITON]:
            try:
                if key == "file":
                    file = value
                elif key == "log-frequency":
                    log_frequency = _int_option(value, 0)
                else:
                    log.warning("--trace-config triton,%s: unknown triton trace setting", key)
                    extra.append((key, value))
            except TraceConfigError as exc:
                raise TraceConfigError(f'Bad option: "--trace-config triton,{key}".\n{exc}') from None
    else:
        if importlib.util.find_spec("opentelemetry") is None or not _otel_importable():
            raise TraceConfigError(OTEL_MISSING)
        given = set()
        for key, value in by_mode[OPENTELEMETRY]:
            if key in (name for name, _, _ in OTEL_BSP):
                try:
                    value = str(_int_option(value, 0, UINT32_MAX))
                except TraceConfigError as exc:
                    raise TraceConfigError(f'Bad option: "--trace-config opentelemetry,{key}".\n{exc}') from None
                given.add(key)
            elif key == "resource" and "=" not in value:
                raise TraceConfigError(
                    f'Bad option: "--trace-config opentelemetry,resource".\nexpected <key>=<value>, got {value}'
                )
            elif key not in ("url", "resource"):
                log.warning("--trace-config opentelemetry,%s: unknown opentelemetry trace setting", key)
            extra.append((key, value))
        for key, variable, default in OTEL_BSP:
            if key not in given:
                value = env.get(variable, default)
                try:
                    value = str(_int_option(value, 0, UINT32_MAX))
                except TraceConfigError as exc:
                    raise TraceConfigError(f'Bad option: "{variable}".\n{exc}') from None
                extra.append((key, value))
        if level & TENSORS:
            log.warning("trace level TENSORS is not supported in opentelemetry mode: tensors are not traced")
    return TraceOptions(
        level=0 if off else level,
        rate=rate,
        count=count,
        log_frequency=log_frequency,
        file=file,
        mode=mode,
        extra=tuple(extra),
    )


def _mode(text: str) -> str:
    low = text.strip().lower()
    if low not in MODES:
        raise TraceConfigError(
            f'invalid value for trace mode option: {low}. Available options are "triton" and "opentelemetry"'
        )
    return low


def _otel_importable() -> bool:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True
