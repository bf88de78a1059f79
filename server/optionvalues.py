"""Parsers of tritonserver's structured option values: ``<group>,<key>=<value>`` (backend,
cache and trace settings; host policies), ``<key>=<value>`` (metrics settings) and
``<name>:<count>[:<device>]`` (rate-limiter resources). Each returns its value or appends a
problem naming the flag and what was expected."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shoal.proto import hostpolicy

METRICS_CONFIG_KEYS = ("summary_latencies", "summary_quantiles", "counter_latencies", "histogram_latencies")


def group_setting(flag: str, text: str, problems: list[str], *, group_required: bool) -> tuple[str, str, str] | None:
    """``<group>,<key>=<value>`` (or ``<key>=<value>`` where the group may be left out:
    then the group is "")."""
    group, sep, setting = text.partition(",")
    if not sep:
        group, setting = "", text
    key, eq, value = setting.partition("=")
    if not eq or not key.strip() or (group_required and not group.strip()):
        form = "<group>,<key>=<value>" if group_required else "[<group>,]<key>=<value>"
        problems.append(f"{flag} '{text}': expected {form}")
        return None
    return group.strip(), key.strip(), value.strip()


def key_value(flag: str, text: str, problems: list[str]) -> tuple[str, str] | None:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        problems.append(f"{flag} '{text}': expected <key>=<value>")
        return None
    return key.strip(), value.strip()


@dataclass(frozen=True, slots=True)
class RateLimitResource:
    name: str
    count: int
    device: int = -1
    """-1: the count holds for every device (Triton's form without a device)."""


def rate_limit_resource(text: str, problems: list[str]) -> RateLimitResource | None:
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0].strip():
            raise ValueError
        count = int(parts[1])
        device = int(parts[2]) if len(parts) == 3 else -1
        if count < 0 or device < -1:
            raise ValueError
    except ValueError:
        problems.append(f"--rate-limit-resource '{text}': expected <name>:<count>[:<device>]")
        return None
    return RateLimitResource(parts[0].strip(), count, device)


def byte_size(text: str) -> int:
    """A size in bytes; Triton's cache size also takes a plain integer only."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def backend_settings(settings: tuple[tuple[str, str, str], ...], backend: str) -> dict[str, str]:
    """The ``--backend-config`` settings one backend sees: global ones (no backend named),
    then its own, which win."""
    out = {key: value for name, key, value in settings if not name}
    out.update({key: value for name, key, value in settings if name == backend})
    return out


def backend_config(args: argparse.Namespace, problems: list[str]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for text in args.backend_config:
        setting = group_setting("--backend-config", text, problems, group_required=False)
        if setting is None:
            continue
        backend, key, value = setting
        if key == "default-max-batch-size":
            try:
                if int(value) < 0:
                    raise ValueError
            except ValueError:
                problems.append(f"--backend-config {text}: default-max-batch-size must be an integer >= 0")
        out.append(setting)
    return tuple(out)


def host_policies(args: argparse.Namespace, problems: list[str]) -> tuple[tuple[str, str, str], ...]:
    """``--host-policy`` settings, checked as Triton checks them (its texts); values too, which
    Triton checks only when an instance with the policy loads."""
    out = []
    for text in args.host_policy or ():
        try:
            name, setting, value = hostpolicy.parse_option(text)
            if setting == "cpu-cores":
                hostpolicy.cpu_cores(value)
            else:
                hostpolicy.numa_node(value)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        out.append((name, setting, value))
    return tuple(out)


def gpu_load_limits(args: argparse.Namespace, problems: list[str]) -> tuple[tuple[int, float], ...]:
    """``--model-load-gpu-limit <device_id>:<fraction>`` settings (Triton's texts); the last one
    given for a device counts."""
    limits: dict[int, float] = {}
    for text in args.model_load_gpu_limit or ():
        first, sep, second = text.partition(":")
        if not sep:
            problems.append(
                "Cannot parse pair option due to incorrect number of inputs.--<pair option> argument requires "
                f"format <first>:<second>. Found: {text}"
            )
            continue
        try:
            device = int(first)
        except ValueError:
            problems.append(f"Invalid option value. Got {first}")
            continue
        try:
            fraction = float(second)
        except ValueError:
            problems.append(f"Invalid option value. Got {second}")
            continue
        limits[device] = fraction
    return tuple(sorted(limits.items()))


def cache_config(args: argparse.Namespace, problems: list[str], notes: list[str]) -> int:
    """The local response cache's size in bytes; 0: no cache."""
    if args.response_cache_byte_size is not None and args.cache_config:
        problems.append("--response-cache-byte-size and --cache-config exclude each other: give one")
    if args.response_cache_byte_size is not None:
        notes.append(
            f"--response-cache-byte-size is deprecated: use --cache-config=local,size={args.response_cache_byte_size}"
        )
        args.cache_config = [f"local,size={args.response_cache_byte_size}"]
    size = -1
    for text in args.cache_config:
        setting = group_setting("--cache-config", text, problems, group_required=True)
        if setting is None:
            continue
        cache, key, value = setting
        if cache != "local":
            problems.append(f"--cache-config {text}: cache '{cache}' is not available (Shoal has 'local')")
        elif key != "size":
            problems.append(f"--cache-config {text}: the local cache takes 'size' only")
        else:
            try:
                size = byte_size(value)
            except ValueError:
                problems.append(f"--cache-config {text}: size must be a number of bytes")
    if args.cache_config and size < 0:
        problems.append("--cache-config needs local,size=<bytes>")
    return max(size, 0) if args.cache_config else 0


def trace_config(args: argparse.Namespace, problems: list[str], notes: list[str]) -> tuple[tuple[str, str, str], ...]:
    """(mode, key, value) settings, the deprecated --trace-* flags folded in."""
    out: list[tuple[str, str, str]] = []
    for flag, key, mode in (
        ("--trace-file", "file", "triton"),
        ("--trace-rate", "rate", ""),
        ("--trace-count", "count", ""),
        ("--trace-log-frequency", "log-frequency", "triton"),
    ):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            notes.append(f"{flag} is deprecated: use --trace-config {mode + ',' if mode else ''}{key}=<value>")
            out.append((mode, key, str(value)))
    for level in args.trace_level:
        notes.append("--trace-level is deprecated: use --trace-config level=<OFF|TIMESTAMPS|TENSORS>")
        out.append(("", "level", level))
    for text in args.trace_config:
        setting = group_setting("--trace-config", text, problems, group_required=False)
        if setting is not None:
            out.append(setting)
    return tuple(out)


def metrics_config(args: argparse.Namespace, problems: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for text in args.metrics_config:
        kv = key_value("--metrics-config", text, problems)
        if kv is None:
            continue
        if kv[0] not in METRICS_CONFIG_KEYS:
            problems.append(f"--metrics-config {text}: unknown setting (expected {', '.join(METRICS_CONFIG_KEYS)})")
        out.append(kv)
    return tuple(out)
