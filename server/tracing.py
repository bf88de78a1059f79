"""Triton's trace extension: trace settings (global and per model, changed at run time over
HTTP and gRPC), sampling, and the trace output: Triton's JSON trace file (``triton`` mode) or
OpenTelemetry spans (``opentelemetry`` mode, when the ``opentelemetry`` packages are there).

Semantics follow Triton's ``server/src/tracer.cc`` (``TraceManager``): a model without a
setting of its own uses the global one; a model setting mirrors every field it does not set
from the global setting (and follows it when the global one changes); null / an empty value
clears a field. Each setting samples one request in ``rate`` while ``count`` (-1: no limit)
is not used up, and collects its traces: written to ``file`` as they finish when neither
``count`` nor ``log_frequency`` is set, otherwise to ``<file>.<n>`` every ``log_frequency``
traces and when ``count`` reaches 0 (and what is left when the setting is replaced or the
server stops: to ``<file>.<n>`` with a log frequency, to ``file`` without).

Timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, the clock of Triton's
``steady_clock``), one clock for every stamp. Compute timestamps come from the router's
send and reply times of the batch and the durations the worker measured (``InferDone``):
``COMPUTE_START`` = sent, ``COMPUTE_END`` = answered, and the worker's input and output
durations at either end with the transfer time split between them, so that
``COMPUTE_OUTPUT_START - COMPUTE_INPUT_END`` is the model's own execution time.

A request pays for tracing only when some setting can sample (``TraceManager.active``, one
attribute test in the frontends); its stages then test ``request.trace is None``. Files are
written by one thread (``_Writer``), never on the event loop.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from shoal.proto.errors import InvalidInput, Unsupported

if TYPE_CHECKING:
    from shoal.server.types import InferRequest, InferResult

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
        raise InvalidInput(f"Unable to parse '{name}', got: {text}")
    value = int(text)
    high = INT32_MAX if low < 0 else UINT32_MAX
    if not -(2**31) <= value <= INT32_MAX or (low == 0 and value < 0):
        raise InvalidInput(f"Unable to parse '{name}', value is out of range [ {low}, {high} ], got: {text}")
    if value < low:
        sep = ": " if grpc else ":"
        raise InvalidInput(f"Unable to parse '{name}'. Expecting value >= {low}, got{sep}{text}")
    return value


def _levels(values: Sequence[str]) -> int | None:
    level: int | None = None
    for text in values:
        if text == "OFF":
            if len(values) != 1:
                raise InvalidInput("Expect only one trace level 'OFF' is specified")
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
            raise InvalidInput("JSON, failed accessing non-array as array")
        else:
            if not all(isinstance(v, str) for v in value):
                raise InvalidInput("JSON, failed accessing non-string as string")
            new.level = _levels(value)
    for name, low in (("trace_rate", 0), ("trace_count", -1), ("log_frequency", 0)):
        if name not in body:
            continue
        value = body[name]
        attr = name.removeprefix("trace_")
        if value is None:
            setattr(new, "clear_" + attr, True)
        elif not isinstance(value, str):
            raise InvalidInput("JSON, failed accessing non-string as string")
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
            raise InvalidInput(f"expect only 1 value for '{name}'")
        else:
            setattr(new, attr, _stoi(name, values[0], grpc=True, low=low))
    return new


# ---- the manager ------------------------------------------------------------------------------


class TraceManager:
    """Settings, sampling and output of one server. ``active``: some setting may sample a
    request now (the frontends test it before anything else)."""

    def __init__(self, options: TraceOptions | None = None, *, otel_exporter: Any = None) -> None:
        self.options = options or TraceOptions()
        self.writer = _Writer()
        self.files: dict[str, TraceFile] = {}
        o = self.options
        self.default = self._setting(o.level, o.rate, o.count, o.log_frequency, frozenset())
        self.global_ = self._setting(o.level, o.rate, o.count, o.log_frequency, frozenset())
        self.models: dict[str, TraceSetting] = {}
        self.fallback_models: set[str] = set()
        self.ids = itertools.count(1)
        self.live: dict[int, TraceTree] = {}
        """Root trace id -> its unfinished tree (BLS calls name their parent by id)."""
        self.otel: _Otel | None = None
        if o.mode == OPENTELEMETRY:
            self.otel = _Otel(o, otel_exporter)
        elif o.level and not self.global_.valid():
            log.warning("tracing is off: %s (--trace-config triton,file=<path>)", self.global_.reason)
        self.active = False
        self._refresh()

    def _file(self, name: str) -> TraceFile:
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = TraceFile(name, self.writer)
        return f

    def _setting(self, level: int, rate: int, count: int, freq: int, specified: frozenset[str]) -> TraceSetting:
        return TraceSetting(level, rate, count, freq, self._file(self.options.file), self.options.mode, specified)

    def _refresh(self) -> None:
        self.active = self.global_.can_sample() or any(s.can_sample() for s in self.models.values())

    # ---- settings ----

    def setting(self, model: str = "") -> TraceSetting:
        return self.models.get(model, self.global_) if model else self.global_

    def update(self, model: str, new: NewSetting) -> None:
        """Triton's ``UpdateTraceSetting``; raises ``InvalidInput`` for a setting that could
        not trace (unless it turns tracing off)."""
        self._update(model, new)
        if not model:
            for name in list(self.fallback_models):
                self._update(name, NewSetting())
        self._refresh()

    def _update(self, model: str, new: NewSetting) -> None:
        current = self.models.get(model) if model else self.global_
        fallback = self.global_ if model else self.default
        fields = {
            "level": (new.level, new.clear_level),
            "rate": (new.rate, new.clear_rate),
            "count": (new.count, new.clear_count),
            "log_frequency": (new.log_frequency, new.clear_log_frequency),
        }
        values: dict[str, int] = {}
        specified: set[str] = set()
        for name, (value, clear) in fields.items():
            mine = current is not None and name in current.specified
            if not clear and (mine or value is not None):
                specified.add(name)
                values[name] = value if value is not None else getattr(current, name)
            else:
                values[name] = getattr(fallback, name)
        if model:
            if not specified:
                old = self.models.pop(model, None)
                self.fallback_models.discard(model)
                if old is not None:
                    old.retire()
                return
            # the file cannot be set per model: a model setting always mirrors some field
            self.fallback_models.add(model)
        setting = self._setting(
            values["level"], values["rate"], values["count"], values["log_frequency"], frozenset(specified)
        )
        if setting.reason and setting.level != 0:
            raise InvalidInput(f"Attempting to set invalid trace setting :{setting.reason}")
        old = current
        if model:
            self.models[model] = setting
        else:
            self.global_ = setting
        if old is not None:
            old.retire()

    def view(self, model: str = "") -> dict[str, str | list[str]]:
        """The settings in effect, as Triton reports them (every value a string; the level
        a list)."""
        s = self.setting(model)
        levels = []
        if s.level & TIMESTAMPS:
            levels.append("TIMESTAMPS")
        if s.level & TENSORS:
            levels.append("TENSORS")
        out: dict[str, str | list[str]] = {
            "trace_level": levels or ["OFF"],
            "trace_rate": str(s.rate),
            "trace_count": str(s.count),
        }
        if s.mode == TRITON:
            out["log_frequency"] = str(s.log_frequency)
            out["trace_file"] = s.file.name
        out["trace_mode"] = s.mode
        for key, value in self.options.extra:
            out[key] = value
        return out

    def view_lists(self, model: str = "") -> dict[str, list[str]]:
        """``view`` for gRPC: a repeated setting (opentelemetry's resource) keeps every value."""
        out = {k: (v if isinstance(v, list) else [v]) for k, v in self.view(model).items()}
        for key in {k for k, _ in self.options.extra}:
            out[key] = [v for k, v in self.options.extra if k == key]
        return out

    # ---- sampling ----

    def sample(self, model: str, carrier: Mapping[str, str] | None = None) -> Trace | None:
        """The root trace of a request for ``model``, or ``None`` when it is not sampled.
        ``carrier``: the request's headers (an OpenTelemetry context there is always traced
        in opentelemetry mode, as Triton does)."""
        setting = self.models.get(model, self.global_)
        parent = None
        if self.otel is not None and carrier is not None and setting.level:
            parent = self.otel.extract(carrier)
        if not setting.sample(parent is not None):
            if setting.count == 0:
                self._refresh()
            return None
        if setting.count == 0:
            self._refresh()
        tree = TraceTree(self, setting, parent)
        root = tree.new_trace(0)
        self.live[root.id] = tree
        return root

    def child_of(self, trace_id: int) -> Trace | None:
        """A new trace under trace ``trace_id`` of a request still running (a BLS call that
        passed ``request.trace()``), or ``None``."""
        for tree in self.live.values():
            parent = tree.traces.get(trace_id)
            if parent is not None:
                return tree.new_trace(trace_id)
        return None

    def close(self) -> None:
        """The server stops: settings write what they hold, files are closed, spans flushed."""
        for tree in list(self.live.values()):
            tree.finish()
        for setting in (self.global_, *self.models.values()):
            setting.retire()
        for f in self.files.values():
            f.close()
        self.writer.stop()
        if self.otel is not None:
            self.otel.shutdown()
        self.active = False


class TraceTree:
    """Every trace spawned from one sampled request (Triton's ``TraceManager::Trace``):
    the root, ensemble steps and BLS calls; written together when the root finishes."""

    __slots__ = ("manager", "setting", "level", "traces", "done", "offset_ns", "otel_parent", "started_ns")

    def __init__(self, manager: TraceManager, setting: TraceSetting, otel_parent: Any = None) -> None:
        self.manager = manager
        self.setting = setting
        self.level = setting.level
        self.traces: dict[int, Trace] = {}
        self.done = False
        self.started_ns = time.monotonic_ns()
        self.offset_ns = time.time_ns() - self.started_ns
        """Wall clock minus monotonic clock (OpenTelemetry spans need wall-clock times)."""
        self.otel_parent = otel_parent

    def new_trace(self, parent_id: int) -> Trace:
        t = Trace(self, next(self.manager.ids), parent_id)
        self.traces[t.id] = t
        return t

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        m = self.manager
        root = min(self.traces)
        m.live.pop(root, None)
        if m.otel is not None:
            try:
                m.otel.export(self)
            except Exception:  # noqa: BLE001 - a tracing failure never fails a request
                log.exception("exporting a trace failed")
            self.setting.abandon()
            return
        parts = []
        for t in self.traces.values():
            parts.extend(t.json_objects())
        self.setting.write(",".join(parts))


class Trace:
    """One traced request (one trace id): its records in the order they happened."""

    __slots__ = ("tree", "id", "parent_id", "records", "stamps", "tensors")

    def __init__(self, tree: TraceTree, trace_id: int, parent_id: int) -> None:
        self.tree = tree
        self.id = trace_id
        self.parent_id = parent_id
        self.records: list[tuple[Any, ...]] = []
        self.stamps = bool(tree.level & TIMESTAMPS)
        self.tensors = bool(tree.level & TENSORS) and tree.manager.otel is None

    def stamp(self, name: str, ns: int = 0) -> None:
        if self.stamps:
            self.records.append(("ts", name, ns or time.monotonic_ns()))

    def child(self) -> Trace:
        """A trace for a request this one makes (an ensemble step)."""
        return self.tree.new_trace(self.id)

    def begin(self, model: str, version: int, request: InferRequest) -> None:
        """The request reached its model's scheduler (REQUEST_START, QUEUE_START and its
        inputs)."""
        now = time.monotonic_ns()
        if self.stamps:
            self.records.append(("model", model, version, request.id))
            self.records.append(("ts", "REQUEST_START", now))
            self.records.append(("ts", "QUEUE_START", now))
        if self.tensors:
            for t in request.inputs:
                data = b"" if t.shm is not None else t.data
                self.records.append(("tensor", "TENSOR_QUEUE_INPUT", t.name, t.datatype, t.shape, data))

    def compute(self, sent_ns: int, done_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """The batch holding this request ran (see the module's note on the four times)."""
        if not self.stamps:
            return
        span = max(0, done_ns - sent_ns)
        spare = span - input_ns - infer_ns - output_ns
        if spare >= 0:
            input_end = sent_ns + input_ns + spare // 2
            output_start = input_end + infer_ns
        else:  # durations longer than the round trip (cannot happen on one clock): clamp
            input_end = min(sent_ns + input_ns, done_ns)
            output_start = max(input_end, done_ns - output_ns)
        r = self.records
        r.append(("ts", "COMPUTE_START", sent_ns))
        r.append(("ts", "COMPUTE_INPUT_END", input_end))
        r.append(("ts", "COMPUTE_OUTPUT_START", output_start))
        r.append(("ts", "COMPUTE_END", done_ns))

    def outputs(self, result: InferResult) -> None:
        """A response of the model (TENSOR_BACKEND_OUTPUT)."""
        if self.tensors:
            for t in result.outputs:
                data = b"" if t.in_shm else t.data
                self.records.append(("tensor", "TENSOR_BACKEND_OUTPUT", t.name, t.datatype, t.shape, data))

    def end(self) -> None:
        self.stamp("REQUEST_END")

    def finish(self) -> None:
        """The frontend is done with the request: the trace is written."""
        self.tree.finish()

    def json_objects(self) -> list[str]:
        """Triton's JSON objects of this trace."""
        out = []
        tid = self.id
        for r in self.records:
            kind = r[0]
            if kind == "ts":
                out.append(f'{{"id":{tid},"timestamps":[{{"name":"{r[1]}","ns":{r[2]}}}]}}')
            elif kind == "model":
                obj: dict[str, Any] = {"id": tid, "model_name": r[1], "model_version": r[2]}
                if r[3]:
                    obj["request_id"] = r[3]
                if self.parent_id:
                    obj["parent_id"] = self.parent_id
                out.append(orjson.dumps(obj).decode())
            else:
                _, activity, name, datatype, shape, data = r
                tensor = {
                    "name": name,
                    "data": tensor_text(datatype, shape, data),
                    "shape": ",".join(str(d) for d in shape),
                    "dtype": datatype,
                }
                out.append(orjson.dumps({"id": tid, "activity": activity, "tensor": tensor}).decode())
        return out


_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def tensor_text(datatype: str, shape: Sequence[int], data: Any) -> str:
    """A tensor's values as Triton writes them in a trace: comma-separated, floats with six
    significant digits (C++'s default), booleans 0/1, BYTES elements quoted; FP16 and BF16
    (and tensors in a client's shared memory, which the router does not map) are empty.
    Triton prints INT8/UINT8 elements as characters; here they are numbers."""
    try:
        count = 1
        for d in shape:
            count *= int(d)
        if datatype == "BYTES":
            raw = bytes(data)
            items = []
            pos = 0
            for _ in range(count):
                if pos + 4 > len(raw):
                    break
                n = int.from_bytes(raw[pos : pos + 4], "little")
                pos += 4
                items.append('"' + raw[pos : pos + n].decode("utf-8", "replace") + '"')
                pos += n
            return ",".join(items)
        dtype = _NUMPY.get(datatype)
        if dtype is None or not len(data):
            return ""
        values = np.frombuffer(data, dtype=dtype, count=count)
        if datatype == "BOOL":
            return ",".join("1" if v else "0" for v in values.tolist())
        if dtype.kind == "f":
            return ",".join(format(v, ".6g") for v in values.tolist())
        return ",".join(str(v) for v in values.tolist())
    except (ValueError, TypeError):
        return ""


# ---- the file writer --------------------------------------------------------------------------


class _Writer:
    """Writes trace files in a thread of its own (started at the first write): ``append``
    adds a trace to a file's JSON array, ``indexed`` writes a whole file, ``close`` ends
    an array."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._files: dict[str, Any] = {}
        self.written = 0
        """Operations done (tests wait on it)."""

    def put(self, op: tuple[str, str, str]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-trace-writer", daemon=True)
            self._thread.start()
        self._queue.put(op)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                break
            try:
                self._do(*op)
                if self._queue.empty():
                    for f in self._files.values():
                        f.flush()
            except OSError as exc:
                log.error("writing trace file %s failed: %s", op[1], exc)
            self.written += 1
        for f in self._files.values():
            try:
                f.write("]")
                f.close()
            except OSError:
                pass
        self._files.clear()

    def _do(self, kind: str, path: str, text: str) -> None:
        f: Any
        if kind == "indexed":
            with open(path, "w", encoding="utf-8") as out:
                out.write("[" + text + "]")
        elif kind == "append":
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open
                f.write("[" + text)
            else:
                f.write("," + text)
        elif kind == "close":
            f = self._files.pop(path, None)
            if f is not None:
                f.write("]")
                f.close()


# ---- OpenTelemetry ----------------------------------------------------------------------------


@dataclass(slots=True)
class _SpanPlan:
    name: str
    start: int
    end: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int]] = field(default_factory=list)


class _Otel:
    """Spans as Triton makes them: a root ``InferRequest`` span (the frontend's stamps as
    its events), under it one span per traced request named after its model (attributes
    triton.model_name, triton.model_version, triton.trace_id, triton.trace_parent_id,
    triton.request_id) and under that a ``compute`` span. Built from the records when the
    request is done; the SDK's batch span processor exports them from its own thread."""

    def __init__(self, options: TraceOptions, exporter: Any = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, Any] = {"service.name": "triton-inference-server"}
        for key, value in options.extra:
            if key == "resource":
                k, _, v = value.partition("=")
                attributes[k] = v
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=options.option("url", OTEL_DEFAULT_URL))
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=int(options.option("bsp_max_queue_size", "2048")),
            schedule_delay_millis=float(options.option("bsp_schedule_delay", "5000")),
            max_export_batch_size=int(options.option("bsp_max_export_batch_size", "512")),
        )
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("triton-server")
        self.propagator = TraceContextTextMapPropagator()

    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The client's span context (W3C ``traceparent``), or ``None``."""
        from opentelemetry import trace as otel_trace

        if "traceparent" not in carrier:
            return None
        ctx = self.propagator.extract(carrier={k.lower(): v for k, v in carrier.items()})
        span = otel_trace.get_current_span(ctx)
        return ctx if span.get_span_context().is_valid else None

    def export(self, tree: TraceTree) -> None:
        from opentelemetry import trace as otel_trace
        from opentelemetry.trace import SpanKind

        off = tree.offset_ns
        end_ns = time.monotonic_ns()
        root = self.tracer.start_span(
            "InferRequest", context=tree.otel_parent, kind=SpanKind.SERVER, start_time=tree.started_ns + off
        )
        requests: dict[int, tuple[Any, int]] = {}
        computes: dict[int, tuple[Any, int, int]] = {}
        for t in sorted(tree.traces.values(), key=lambda x: x.id):
            request, compute = _plans(t, root, off)
            if request is None:
                continue
            parent = root
            if t.parent_id in requests:
                parent = requests[t.parent_id][0]
                window = computes.get(t.parent_id)
                if window is not None and window[1] <= request.start <= window[2]:
                    parent = window[0]  # a BLS call made while its caller executed
            span = self.tracer.start_span(
                request.name,
                context=otel_trace.set_span_in_context(parent),
                kind=SpanKind.SERVER,
                start_time=request.start + off,
                attributes=request.attributes,
            )
            for name, ns in request.events:
                span.add_event(name, timestamp=ns + off)
            requests[t.id] = (span, request.end)
            if compute is not None:
                cspan = self.tracer.start_span(
                    "compute",
                    context=otel_trace.set_span_in_context(span),
                    kind=SpanKind.SERVER,
                    start_time=compute.start + off,
                )
                for name, ns in compute.events:
                    cspan.add_event(name, timestamp=ns + off)
                computes[t.id] = (cspan, compute.start, compute.end)
        for cspan, _, cend in computes.values():
            cspan.end(end_time=cend + off)
        for trace_id in sorted(requests, reverse=True):  # children before their parents
            span, rend = requests[trace_id]
            span.end(end_time=rend + off)
        root.end(end_time=end_ns + off)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _plans(t: Trace, root: Any, off: int) -> tuple[_SpanPlan | None, _SpanPlan | None]:
    """The request and compute spans of one trace from its records; the frontend's stamps
    (and any before the request started) go on the root span."""
    request: _SpanPlan | None = None
    compute: _SpanPlan | None = None
    for r in t.records:
        if r[0] == "model":
            attrs: dict[str, Any] = {
                "triton.model_name": r[1],
                "triton.model_version": r[2],
                "triton.trace_id": t.id,
                "triton.trace_parent_id": t.parent_id,
            }
            if r[3]:
                attrs["triton.request_id"] = r[3]
            request = _SpanPlan(r[1], 0, 0, attrs)
        elif r[0] == "ts":
            name, ns = r[1], r[2]
            if name in FRONTEND_STAMPS or request is None:
                root.add_event(name, timestamp=ns + off)
            elif name.startswith("COMPUTE_"):
                if compute is None:
                    compute = _SpanPlan("compute", ns, ns)
                compute.events.append((name, ns))
                compute.end = ns
            else:
                if name == "REQUEST_START":
                    request.start = ns
                request.events.append((name, ns))
                request.end = max(request.end, ns)
    if request is not None and compute is not None:
        request.end = max(request.end, compute.end)
    return request, compute
