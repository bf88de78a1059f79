"""``--http-header-forward-pattern`` / ``--grpc-header-forward-pattern``: request headers (gRPC
metadata) whose name matches the pattern, anywhere and case-insensitively as in Triton,
reach the model as string request parameters. A parameter the request sets itself wins."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


class HeaderForwarder:
    __slots__ = ("_rx",)

    def __init__(self, pattern: str) -> None:
        self._rx = re.compile(pattern, re.IGNORECASE) if pattern else None

    def __bool__(self) -> bool:
        return self._rx is not None

    def apply(self, headers: Iterable[tuple[str, Any]], parameters: dict[str, Any]) -> None:
        rx = self._rx
        if rx is None:
            return
        for name, value in headers:
            # binary gRPC metadata (``-bin`` keys) has no string form
            if isinstance(value, str) and name not in parameters and rx.search(name):
                parameters[name] = value
