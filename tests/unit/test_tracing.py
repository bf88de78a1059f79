"""``server.tracing`` without a server: reading --trace-config as Triton does, settings updates
and fallbacks, sampling by rate and count, what goes to which file, tensor text, the compute
times, and OpenTelemetry spans through the SDK's in-memory exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.proto.errors import InvalidInput, Unsupported
from shoal.server import tracing
from shoal.server.tracing import (
    OPENTELEMETRY,
    TENSORS,
    TIMESTAMPS,
    NewSetting,
    TraceConfigError,
    TraceManager,
    TraceOptions,
    options,
    parse_options,
    tensor_text,
)
from shoal.server.types import InferRequest, InferResult, InputTensor, OutputTensor


def test_defaults_are_tritons() -> None:
    o = parse_options([])
    assert (o.level, o.rate, o.count, o.log_frequency, o.file, o.mode) == (0, 1000, -1, 0, "", "triton")


def test_levels_combine_and_off_wins() -> None:
    both = parse_options([("", "level", "TIMESTAMPS"), ("", "level", "tensors")])
    assert both.level == TIMESTAMPS | TENSORS
    assert parse_options([("", "level", "TIMESTAMPS"), ("", "level", "OFF")]).level == 0
    assert parse_options([("", "level", "max")]).level == TIMESTAMPS


def test_last_value_wins() -> None:
    o = parse_options([("", "rate", "1000"), ("triton", "file", "a"), ("", "rate", "7"), ("triton", "file", "b")])
    assert (o.rate, o.file) == (7, "b")
    assert parse_options([("TRITON", "log-frequency", "50")]).log_frequency == 50


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("", "level", "loud"), 'Bad option: "--trace-config level".\ninvalid value for trace level option: loud'),
        (("", "rate", "x"), 'Bad option: "--trace-config rate".\nInvalid option value. Got x'),
        (("", "count", "-2"), 'Bad option: "--trace-config count"'),
        (("", "mode", "zipkin"), 'invalid value for trace mode option: zipkin. Available options are "triton"'),
        (("jaeger", "url", "x"), "invalid value for trace mode option: jaeger"),
        (("triton", "log-frequency", "-1"), 'Bad option: "--trace-config triton,log-frequency"'),
    ],
)
def test_bad_settings(setting: tuple[str, str, str], message: str) -> None:
    with pytest.raises(TraceConfigError) as info:
        parse_options([setting])
    assert message in str(info.value)


def test_opentelemetry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "_otel_importable", lambda: True)
    o = parse_options(
        [("", "mode", "opentelemetry"), ("opentelemetry", "url", "u"), ("opentelemetry", "bsp_schedule_delay", "9")],
        environ={"OTEL_BSP_MAX_QUEUE_SIZE": "17"},
    )
    assert o.mode == OPENTELEMETRY
    assert dict(o.extra) == {
        "url": "u",
        "bsp_schedule_delay": "9",
        "bsp_max_queue_size": "17",
        "bsp_max_export_batch_size": "512",
    }
    with pytest.raises(TraceConfigError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        parse_options([("", "mode", "opentelemetry")], environ={"OTEL_BSP_MAX_QUEUE_SIZE": "many"})
    with pytest.raises(TraceConfigError, match="resource"):
        parse_options([("", "mode", "opentelemetry"), ("opentelemetry", "resource", "novalue")])


def test_opentelemetry_without_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "_otel_importable", lambda: False)
    with pytest.raises(TraceConfigError) as info:
        parse_options([("", "mode", "opentelemetry")])
    assert "pip install 'shoal[trace]'" in str(info.value)


# ---- settings -------------------------------------------------------------------------------


def _manager(tmp_path: Path, **kw: Any) -> TraceManager:
    base = {"level": TIMESTAMPS, "rate": 1, "file": str(tmp_path / "t.json")}
    return TraceManager(TraceOptions(**{**base, **kw}))


def test_clearing_follows_tritons_fallbacks(tmp_path: Path) -> None:
    """qa/L0_trace/trace_endpoint_test.py test_http_clear_settings, on the manager."""
    m = _manager(tmp_path)
    m.update("simple", tracing.from_json({"trace_rate": "12", "log_frequency": "34"}))
    m.update("", tracing.from_json({"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]}))
    m.update("", tracing.from_json({"trace_rate": None, "trace_count": None}))
    glob = m.view()
    assert (glob["trace_level"], glob["trace_rate"], glob["trace_count"]) == (["OFF"], "1", "-1")
    model = m.view("simple")
    assert (model["trace_level"], model["trace_rate"], model["log_frequency"]) == (["OFF"], "12", "34")
    m.update("simple", tracing.from_json({"trace_rate": None, "trace_level": None}))
    model = m.view("simple")
    assert (model["trace_level"], model["trace_rate"], model["log_frequency"]) == (["OFF"], "1", "34")
    m.update("simple", tracing.from_json({"log_frequency": None}))
    assert "simple" not in m.models  # nothing of its own: the global setting again
    m.close()


def test_invalid_updates_are_refused_unless_they_turn_tracing_off(tmp_path: Path) -> None:
    m = TraceManager(TraceOptions())  # no file: nothing can be traced in triton mode
    with pytest.raises(InvalidInput, match="Attempting to set invalid trace setting :trace file name is not given"):
        m.update("", NewSetting(level=TIMESTAMPS))
    m.update("", NewSetting(level=0, rate=5))
    assert m.view()["trace_rate"] == "5" and not m.active
    m2 = _manager(tmp_path)
    with pytest.raises(InvalidInput, match="sample rate must be non-zero"):
        m2.update("", NewSetting(rate=0))
    m.close()
    m2.close()


def test_request_parsing() -> None:
    with pytest.raises(Unsupported):
        tracing.from_json({"trace_file": None})
    assert tracing.from_json({"trace_level": ["TIMESTAMPS", "TENSORS"]}).level == TIMESTAMPS | TENSORS
    assert tracing.from_json({"trace_level": ["NOISE"]}).level is None  # ignored, as Triton does
    assert tracing.from_grpc({"trace_level": []}).clear_level
    assert tracing.from_grpc({"trace_count": ["-1"]}).count == -1
    with pytest.raises(InvalidInput, match=r"got: -5$"):
        tracing.from_grpc({"trace_rate": ["-5"]})


# ---- sampling and files ---------------------------------------------------------------------


def _run(m: TraceManager, model: str = "m", request_id: str = "") -> bool:
    trace = m.sample(model)
    if trace is None:
        return False
    trace.begin(model, 1, InferRequest(model, 1, [], id=request_id))
    trace.end()
    trace.finish()
    return True


def test_rate_and_count(tmp_path: Path) -> None:
    m = _manager(tmp_path, rate=3, count=2)
    assert [_run(m) for _ in range(9)] == [False, False, True, False, False, True, False, False, False]
    assert m.view()["trace_count"] == "0"
    assert not m.active  # the frontends stop asking
    m.update("", NewSetting(count=1))
    assert m.active
    assert [_run(m) for _ in range(4)] == [False, False, True, False]  # a new setting counts anew
    m.close()
    assert len(json.loads(Path(f"{tmp_path}/t.json.0").read_text())) == 2 * 4
    assert len(json.loads(Path(f"{tmp_path}/t.json.1").read_text())) == 4
    assert not (tmp_path / "t.json").exists()


def test_unlimited_traces_stream_into_one_array(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    for i in range(3):
        _run(m, request_id=f"r{i}")
    m.close()
    objects = json.loads((tmp_path / "t.json").read_text())
    assert [o["request_id"] for o in objects if "request_id" in o] == ["r0", "r1", "r2"]
    assert len({o["id"] for o in objects}) == 3


def test_replaced_setting_writes_what_it_kept_once_its_traces_end(tmp_path: Path) -> None:
    m = _manager(tmp_path, log_frequency=10)
    running = m.sample("m")
    assert running is not None
    _run(m, request_id="done")
    m.update("", NewSetting(rate=2))  # the old setting goes, one of its traces still runs
    assert m.writer.written == 0
    running.finish()
    m.close()
    assert len(json.loads((tmp_path / "t.json.0").read_text())) == 4 + 0


def test_compute_times_keep_the_models_own_duration() -> None:
    m = TraceManager(TraceOptions(level=TIMESTAMPS, rate=1, file="/nonexistent/never-written"))
    t = m.sample("m")
    assert t is not None
    t.compute(1000, 2000, 100, 500, 200)
    stamps = {r[1]: r[2] for r in t.records}
    assert stamps["COMPUTE_START"] == 1000 and stamps["COMPUTE_END"] == 2000
    assert stamps["COMPUTE_OUTPUT_START"] - stamps["COMPUTE_INPUT_END"] == 500
    assert stamps["COMPUTE_INPUT_END"] - 1000 == 100 + 100  # half of the transfer time each side
    t.compute(1000, 1100, 100, 500, 200)  # cannot happen on one clock: still ordered
    times = [r[2] for r in t.records[4:]]
    assert times == sorted(times)


def test_tensor_text() -> None:
    assert tensor_text("FP32", (2, 2), np.array([0.1, 1e-7, 3, -2.5], np.float32).tobytes()) == "0.1,1e-07,3,-2.5"
    assert tensor_text("BOOL", (3,), np.array([True, False, True]).tobytes()) == "1,0,1"
    assert tensor_text("INT8", (2,), np.array([-1, 65], np.int8).tobytes()) == "-1,65"
    assert tensor_text("INT64", (1,), np.array([2**40], np.int64).tobytes()) == str(2**40)
    assert tensor_text("FP16", (1,), np.array([1], np.float16).tobytes()) == ""
    raw = b"".join(len(s).to_bytes(4, "little") + s for s in (b"ab", b""))
    assert tensor_text("BYTES", (2,), raw) == '"ab",""'


def test_tensor_records(tmp_path: Path) -> None:
    m = _manager(tmp_path, level=TENSORS)
    t = m.sample("m")
    assert t is not None
    data = np.array([1, 2], np.int32).tobytes()
    t.begin("m", 1, InferRequest("m", 1, [InputTensor("X", "INT32", (2,), data)]))
    t.outputs(InferResult("m", 1, [OutputTensor("Y", "INT32", (1, 2), data)]))
    t.end()
    t.finish()
    m.close()
    objects = json.loads((tmp_path / "t.json").read_text())
    assert objects == [
        {
            "id": t.id,
            "activity": "TENSOR_QUEUE_INPUT",
            "tensor": {"name": "X", "data": "1,2", "shape": "2", "dtype": "INT32"},
        },
        {
            "id": t.id,
            "activity": "TENSOR_BACKEND_OUTPUT",
            "tensor": {"name": "Y", "data": "1,2", "shape": "1,2", "dtype": "INT32"},
        },
    ]


# ---- OpenTelemetry --------------------------------------------------------------------------


def test_opentelemetry_spans_in_memory() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the trace extra (opentelemetry-sdk) is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    options = TraceOptions(level=TIMESTAMPS, rate=1, mode=OPENTELEMETRY, extra=(("bsp_schedule_delay", "10"),))
    m = TraceManager(options, otel_exporter=exporter)
    root = m.sample("ens")
    assert root is not None
    root.stamp("HTTP_RECV_START")
    root.begin("ens", 1, InferRequest("ens", 1, [], id="req-7"))
    step = root.child()
    step.begin("m", 2, InferRequest("m", 2, []))
    now = __import__("time").monotonic_ns()
    step.compute(now, now + 1000, 100, 500, 200)
    step.end()
    root.end()
    root.stamp("HTTP_SEND_END")
    root.finish()
    m.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"InferRequest", "ens", "m", "compute"}
    assert [e.name for e in spans["InferRequest"].events] == ["HTTP_RECV_START", "HTTP_SEND_END"]
    ens, model, compute = spans["ens"], spans["m"], spans["compute"]
    assert ens.parent is not None and ens.parent.span_id == spans["InferRequest"].context.span_id
    assert model.parent is not None and model.parent.span_id == ens.context.span_id
    assert compute.parent is not None and compute.parent.span_id == model.context.span_id
    assert ens.attributes is not None and model.attributes is not None
    assert ens.attributes["triton.request_id"] == "req-7"
    assert model.attributes["triton.model_version"] == 2
    assert model.attributes["triton.trace_parent_id"] == ens.attributes["triton.trace_id"]
    assert [e.name for e in compute.events][0] == "COMPUTE_START"
    assert compute.end_time is not None and model.end_time is not None and compute.end_time <= model.end_time


def test_deprecated_flags_and_trace_config_together(tmp_path: Path) -> None:
    """tritonserver's deprecated --trace-* flags fold into --trace-config, which wins."""
    from shoal.server.config import parse

    cfg = parse(
        [
            "--model-repository",
            str(tmp_path),
            "--trace-file=/tmp/old.json",
            "--trace-level=TIMESTAMPS",
            "--trace-rate=5",
            "--trace-log-frequency=3",
            "--trace-config=rate=7",
            "--trace-config=level=TENSORS",
        ],
        triton=True,
    )
    o = parse_options(cfg.trace_config)
    assert (o.file, o.rate, o.log_frequency, o.level) == ("/tmp/old.json", 7, 3, TIMESTAMPS | TENSORS)
