"""Trace settings (global and per model) and their updates over HTTP and gRPC, as Triton's
``TraceManager`` keeps them; sampling and where each setting's traces are written."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.proto import errortexts as T
from shoal.proto.errors import Unsupported
from shoal.server.tracing.options import (
    _INTEGER,
    FILE_NOT_UPDATABLE,
    INT32_MAX,
    OPENTELEMETRY,
    TENSORS,
    TIMESTAMPS,
    TRITON,
    UINT32_MAX,
)
from shoal.server.tracing.output import _Writer

log = logging.getLogger("shoal.trace")


# ---- settings ---------------------------------------------------------------------------------


@dataclass(slots=True)
class NewSetting:
    """A settings update (Triton's ``TraceManager::NewSetting``): ``None`` leaves a field
    as it is, ``clear_*`` makes it mirror the fallback again."""

    level: int | None = None
    rate: int | None = None
    count: int | None = None
    log_frequency: int | None = None
    clear_level: bool = False
    clear_rate: bool = False
    clear_count: bool = False
    clear_log_frequency: bool = False

    def empty(self) -> bool:
        return self == NewSetting()


class TraceFile:
    """One trace file: the traces written without an index go into ``name`` as one JSON
    array (opened at the first write, closed by ``close``); indexed writes make whole files
    ``name.0``, ``name.1``, ..."""

    def __init__(self, name: str, writer: _Writer) -> None:
        self.name = name
        self.index = 0
        self.opened = False
        self.writer = writer

    def save(self, text: str, indexed: bool) -> None:
        if not self.name or not text:
            return
        if indexed:
            self.writer.put(("indexed", f"{self.name}.{self.index}", text))
            self.index += 1
        else:
            self.writer.put(("append", self.name, text))
            self.opened = True

    def close(self) -> None:
        if self.opened:
            self.writer.put(("close", self.name, ""))
            self.opened = False


class TraceSetting:
    """One setting (global or a model's) and its sampling state; replaced as a whole by an
    update, so that traces in flight finish under the setting that sampled them."""

    __slots__ = (
        "level",
        "rate",
        "count",
        "log_frequency",
        "file",
        "mode",
        "specified",
        "reason",
        "sample_",
        "created",
        "collected",
        "pending",
        "in_stream",
        "live",
        "retired",
        "streaming",
    )

    def __init__(
        self,
        level: int,
        rate: int,
        count: int,
        log_frequency: int,
        file: TraceFile,
        mode: str,
        specified: frozenset[str] = frozenset(),
    ) -> None:
        self.level = level
        self.rate = rate
        self.count = count
        self.log_frequency = log_frequency
        self.file = file
        self.mode = mode
        self.specified = specified
        """The fields set on this setting itself (the others mirror the fallback)."""
        self.reason = ""
        if level == 0:
            self.reason = "tracing is disabled"
        elif rate == 0:
            self.reason = "sample rate must be non-zero"
        elif mode == TRITON and not file.name:
            self.reason = "trace file name is not given"
        self.sample_ = 0
        self.created = 0
        self.collected = 0
        self.pending: list[str] = []
        """Finished traces not written yet."""
        self.in_stream = 0
        """Traces finished since the last indexed file (Triton's sample_in_stream_)."""
        self.live = 0
        """Sampled traces not finished yet."""
        self.retired = False
        self.streaming = log_frequency == 0 and count == -1
        """Each trace goes to the file as it finishes (Triton would keep them until the
        setting goes: same file in the end, without holding every trace in memory)."""

    def valid(self) -> bool:
        return not self.reason and self.count != 0

    def can_sample(self) -> bool:
        return self.valid() or (self.mode == OPENTELEMETRY and self.level != 0)

    def sample(self, force: bool = False) -> bool:
        """Whether this request is traced (one in ``rate`` while ``count`` lasts; ``force``:
        a propagated OpenTelemetry context, traced whatever the rate and count)."""
        hit = False
        if self.rate != 0:
            if not self.valid() and not force:
                return False
            self.sample_ += 1
            hit = self.sample_ % self.rate == 0
            if hit and self.count > 0:
                self.count -= 1
                self.created += 1
            elif hit and self.count == 0:
                hit = False
            elif hit:
                self.created += 1
        if hit or force:
            self.live += 1
            return True
        return False

    def write(self, text: str) -> None:
        """A finished trace (Triton's ``WriteTrace``)."""
        self.live -= 1
        self.collected += 1
        if self.mode == TRITON:
            if self.streaming:
                self.file.save(text, indexed=False)
            else:
                if text:  # a trace with nothing recorded (a level without TIMESTAMPS) counts, empty
                    self.pending.append(text)
                self.in_stream += 1
                if (self.count == 0 and self.collected >= self.created) or (
                    self.log_frequency and self.in_stream >= self.log_frequency
                ):
                    self.file.save(",".join(self.pending), indexed=True)
                    self.pending.clear()
                    self.in_stream = 0
        if self.retired and self.live == 0:
            self._flush()

    def abandon(self) -> None:
        """A sampled trace that writes nothing (OpenTelemetry mode)."""
        self.live -= 1
        if self.retired and self.live == 0:
            self._flush()

    def retire(self) -> None:
        """Replaced or the server stops: what is left is written once no trace runs."""
        self.retired = True
        if self.live == 0:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.file.save(",".join(self.pending), indexed=self.log_frequency != 0)
            self.pending.clear()
        self.in_stream = 0


def _stoi(name: str, text: str, *, grpc: bool, low: int) -> int:
    """Triton's ``std::stoi`` of a setting value, with its error texts."""
    if not _INTEGER.fullmatch(text):
        raise T.TRACE_SETTING_NOT_INTEGER(name=name, text=text)
    value = int(text)
    high = INT32_MAX if low < 0 else UINT32_MAX
    if not -(2**31) <= value <= INT32_MAX or (low == 0 and value < 0):
        raise T.TRACE_SETTING_OUT_OF_RANGE(name=name, low=low, high=high, text=text)
    if value < low:
        sep = ": " if grpc else ":"
        raise T.TRACE_SETTING_BELOW(name=name, low=low, sep=sep, text=text)
    return value


def _levels(values: Sequence[str]) -> int | None:
    level: int | None = None
    for text in values:
        if text == "OFF":
            if len(values) != 1:
                raise T.TRACE_LEVEL_OFF_ALONE()
            level = 0
        elif text == "TIMESTAMPS":
            level = (level or 0) | TIMESTAMPS
        elif text == "TENSORS":
            level = (level or 0) | TENSORS
    return level


def from_json(body: Mapping[str, Any]) -> NewSetting:
    """An HTTP trace setting request (Triton's ``HandleTrace``): strings, a list of level
    strings, or null to clear."""
    new = NewSetting()
    if "trace_file" in body:
        raise Unsupported(FILE_NOT_UPDATABLE)
    if "trace_level" in body:
        value = body["trace_level"]
        if value is None:
            new.clear_level = True
        elif not isinstance(value, list):
            raise T.JSON_NOT_ARRAY()
        else:
            if not all(isinstance(v, str) for v in value):
                raise T.JSON_NOT_STRING()
            new.level = _levels(value)
    for name, low in (("trace_rate", 0), ("trace_count", -1), ("log_frequency", 0)):
        if name not in body:
            continue
        value = body[name]
        attr = name.removeprefix("trace_")
        if value is None:
            setattr(new, "clear_" + attr, True)
        elif not isinstance(value, str):
            raise T.JSON_NOT_STRING()
        else:
            setattr(new, attr, _stoi(name, value, grpc=False, low=low))
    return new


def from_grpc(settings: Mapping[str, Sequence[str]]) -> NewSetting:
    """A gRPC ``TraceSettingRequest``'s settings: no value clears a setting."""
    new = NewSetting()
    if "trace_file" in settings:
        raise Unsupported(FILE_NOT_UPDATABLE)
    if "trace_level" in settings:
        values = settings["trace_level"]
        if not values:
            new.clear_level = True
        else:
            new.level = _levels(values)
    for name, low in (("trace_rate", 0), ("trace_count", -1), ("log_frequency", 0)):
        if name not in settings:
            continue
        values = settings[name]
        attr = name.removeprefix("trace_")
        if not values:
            setattr(new, "clear_" + attr, True)
        elif len(values) != 1:
            raise T.TRACE_SETTING_ONE_VALUE(name=name)
        else:
            setattr(new, attr, _stoi(name, values[0], grpc=True, low=low))
    return new
