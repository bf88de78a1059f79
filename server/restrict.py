"""Restricted APIs: Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``.

``<apis>:<key>=<value>``: every API group named (comma-separated) answers only requests that
carry header ``<key>`` (HTTP) or metadata ``triton-grpc-protocol-<key>`` (gRPC) with exactly
``<value>``; others get Triton's answer (HTTP 403, gRPC UNAVAILABLE, "This API is restricted,
expecting header '<key>'"). Groups are Triton's, plus Shoal's ``admin`` (the worker admin
API) and ``status`` (the status page ``/`` and ``/v2/status``). A group may appear in one
setting only.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

CATEGORIES = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
    "admin",
    "status",
)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


@dataclass(frozen=True, slots=True)
class Restrictions:
    """Which API groups need which header, for one frontend."""

    rules: MappingProxyType[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    """group -> (header name, expected value)."""

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, category: str, header: Callable[[str], str | None]) -> str | None:
        """``None`` when the request may use ``category``; else the header it lacks.
        ``header(name)`` reads one request header."""
        rule = self.rules.get(category)
        if rule is None:
            return None
        name, value = rule
        got = header(name)
        if got is not None and hmac.compare_digest(got.encode(), value.encode()):
            return None
        return name


def parse(settings: Iterable[str], *, flag: str, what: str, header_prefix: str = "") -> tuple[Restrictions, list[str]]:
    """Parse every ``<apis>:<key>=<value>`` setting of one flag; returns the restrictions
    and the problems found (Triton's wording)."""
    rules: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for setting in settings:
        apis, sep, kv = setting.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not apis or not key:
            problems.append(f"{flag} '{setting}': expected <{what}s>:<key>=<value>")
            continue
        for api in (a.strip() for a in apis.split(",")):
            if api not in CATEGORIES:
                problems.append(f"{flag}: unknown restricted {what} '{api}' (one of {', '.join(CATEGORIES)})")
            elif api in rules:
                problems.append(f"{flag}: restricted {what} '{api}' can not be specified in multiple config groups")
            else:
                name = header_prefix + key
                rules[api] = (name.lower() if header_prefix else name, value)
    return Restrictions(MappingProxyType(rules)), problems


def message(header: str, *, grpc: bool = False) -> str:
    """Triton's answer to a request without the header."""
    if grpc:
        return f"This protocol is restricted, expecting header '{header}'"
    return f"This API is restricted, expecting header '{header}'"
