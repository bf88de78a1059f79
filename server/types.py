"""Transport-neutral request and response types: what frontends decode into and encode from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class InputTensor:
    """One request input. ``data`` holds raw little-endian bytes (BYTES length-prefixed)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Buffer
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: int
    """``-1``: the version policy chooses (highest READY version)."""
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None
    """``None``: every output of the model."""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Buffer


@dataclass(slots=True)
class InferResult:
    """Outputs of one request. ``release`` must be called once the frontend has encoded
    the outputs: their ``data`` may be views of a worker's shared memory."""

    model_name: str
    model_version: int
    outputs: list[OutputTensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] | None = None

    def done(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()
