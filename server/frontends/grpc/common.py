"""What the gRPC services share: the stand-in for a message that did not parse, and the
restricted-API check."""

from __future__ import annotations

from typing import Any

from shoal.server import restrict

MALFORMED: Any = type("Malformed", (), {"__repr__": lambda self: "<malformed message>"})()
"""What the deserializers return for bytes that are not the expected message."""
MALFORMED_MESSAGE = "failed to parse the request message"


def restricted(service: Any, category: str, context: Any) -> str | None:
    """Why ``context`` may not use the API group ``category`` (None: it may)."""
    rules: restrict.Restrictions = service.restrictions
    if not rules:
        return None
    metadata = dict(context.invocation_metadata() or ())
    missing = rules.check(category, metadata.get)
    return restrict.message(missing, grpc=True) if missing is not None else None
