"""``TraceManager`` (the server's settings, sampling and output) and ``Trace`` (one traced
request's timestamps and tensors; ensemble steps and BLS calls as children)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from shoal.proto.errors import InvalidInput
from shoal.server.tracing.options import OPENTELEMETRY, TENSORS, TIMESTAMPS, TRITON, TraceOptions
from shoal.server.tracing.otel import _Otel
from shoal.server.tracing.output import _Writer, tensor_text
from shoal.server.tracing.settings import NewSetting, TraceFile, TraceSetting

if TYPE_CHECKING:
    from shoal.server.types import InferRequest, InferResult

log = logging.getLogger("shoal.trace")


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

    __slots__ = (
        "manager",
        "setting",
        "level",
        "traces",
        "done",
        "offset_ns",
        "otel_parent",
        "started_ns",
        "running",
        "released",
    )

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
        self.running = 0
        """Traces of the tree that reached a scheduler and have not ended (REQUEST_END)."""
        self.released = False
        """The frontend is done with the root: the tree is written once nothing runs."""

    def new_trace(self, parent_id: int) -> Trace:
        t = Trace(self, next(self.manager.ids), parent_id)
        self.traces[t.id] = t
        return t

    def release(self) -> None:
        """The frontend has sent the root's last response; a decoupled request may still be
        executing (its final response can come before its execution ends): the tree is
        written when it has ended."""
        self.released = True
        if self.running <= 0:
            self.finish()

    def ended(self) -> None:
        self.running -= 1
        if self.released and self.running <= 0:
            self.finish()

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
        self.tree.running += 1
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
        self.tree.ended()

    def finish(self) -> None:
        """The frontend is done with the request: the trace is written (once every request
        of its tree that began has ended)."""
        self.tree.release()

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
