"""Parsers of tritonserver's structured option values: ``<group>,<key>=<value>`` (backend,
cache and trace settings), ``<key>=<value>`` (metrics settings) and
``<name>:<count>[:<device>]`` (rate-limiter resources). Each returns its value or appends a
problem naming the flag and what was expected."""

from __future__ import annotations

from dataclasses import dataclass


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
