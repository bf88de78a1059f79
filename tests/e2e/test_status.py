"""The status page's JSON (``GET /v2/status``) through the real server, with traffic from
tritonclient over HTTP and gRPC: models and their states (a broken one with its reason),
workers and their pids, queue depth, per-model throughput and latency points, failures, and
the recent events (a load failure, a worker that exited); ``GET /`` serves the page itself
(no external asset); ``--http-restricted-api status:...`` guards both."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until

INTERVAL_S = 0.5
ENV = {"SHOAL_STATUS_INTERVAL_S": str(INTERVAL_S)}


def _repo(tmp: Any) -> Any:
    repo = make_repository(tmp, "add_sub", "crashy")
    broken = repo / "broken"
    broken.mkdir()
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nthis is not a config\n')
    return repo


@pytest.fixture(scope="module")
def sserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(_repo(tmp_path_factory.mktemp("repo")), env=ENV).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _get(srv: ServerProcess, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{srv.url}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def status(srv: ServerProcess) -> dict[str, Any]:
    code, headers, body = _get(srv, "/v2/status")
    assert code == 200, body
    assert headers["Content-Type"].startswith("application/json")
    result: dict[str, Any] = json.loads(body)
    return result


def _add_sub_inputs(mod: Any) -> list[Any]:
    a = np.arange(4, dtype=np.float32)
    inputs = [mod.InferInput("INPUT0", [4], "FP32"), mod.InferInput("INPUT1", [4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    return inputs


def _crashy(srv: ServerProcess, value: int) -> None:
    inp = httpclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([value], dtype=np.int32))
    srv.client().infer("crashy", [inp])


def test_status_with_traffic(sserver: ServerProcess) -> None:
    http = sserver.client()
    grpc = grpcclient.InferenceServerClient(sserver.grpc_url)
    try:
        for _ in range(60):
            http.infer("add_sub", _add_sub_inputs(httpclient))
            grpc.infer("add_sub", _add_sub_inputs(grpcclient))
    finally:
        grpc.close()

    def sampled() -> bool:
        s = status(sserver)["series"].get("add_sub", {})
        return sum(s.get("rps", [])) > 0 and any(v is not None for v in s.get("p50_ms", []))

    wait_until(sampled, 15)
    time.sleep(2 * INTERVAL_S)  # the interval that saw the last requests is in too
    st = status(sserver)
    assert st["server"]["live"] is True and st["server"]["ready"] is False  # 'broken' did not load
    assert st["interval_s"] == INTERVAL_S and st["history_s"] == 600
    models = {m["name"]: m for m in st["models"]}
    assert models["add_sub"]["state"] == "READY" and models["add_sub"]["version"] == "1"
    assert models["broken"]["state"] == "UNAVAILABLE" and models["broken"]["reason"]
    workers = {w["instance"]: w for w in st["workers"]}
    assert workers["add_sub_0"]["pid"] in sserver.worker_pids("add_sub")
    assert {"state", "device", "restarts", "outstanding", "reason"} <= set(workers["add_sub_0"])
    assert st["queue"]["pending"] == 0 and st["queue"]["models"]["add_sub"] == 0
    s = st["series"]["add_sub"]
    assert set(s) == {"t", "rps", "failures", "p50_ms", "p99_ms", "avg_ms", "pending"}
    assert len({len(v) for v in s.values()}) == 1  # columns of one length
    assert s["t"] == sorted(s["t"])
    # every request counted once: requests/s times each point's interval adds up to the 120 sent
    spans = [INTERVAL_S] + [b - a for a, b in zip(s["t"], s["t"][1:], strict=False)]
    served = sum(r * span for r, span in zip(s["rps"], spans, strict=True))
    assert 114 <= served <= 126, (s["rps"], s["t"])
    points = [(p50, p99, avg) for p50, p99, avg in zip(s["p50_ms"], s["p99_ms"], s["avg_ms"], strict=True) if p50]
    assert points and all(0 < p50 <= p99 < 10_000 and avg > 0 for p50, p99, avg in points)
    assert not any(s["failures"])
    loads = [e for e in st["events"] if e["kind"] == "load failed" and e["model"] == "broken"]
    assert loads and loads[0]["message"], st["events"]


def test_failures_and_worker_exit_events(sserver: ServerProcess) -> None:
    with pytest.raises(InferenceServerException):
        _crashy(sserver, 3)  # the model raises: a failed request
    with pytest.raises(InferenceServerException):
        _crashy(sserver, 4)  # the worker exits with status 3

    def seen() -> bool:
        st = status(sserver)
        exited = [e for e in st["events"] if e["kind"] == "worker exited" and e["model"] == "crashy"]
        return bool(exited) and sum(st["series"].get("crashy", {}).get("failures", [])) > 0

    wait_until(seen, 20)
    st = status(sserver)
    (event,) = [e for e in st["events"] if e["kind"] == "worker exited"]
    assert event["instance"] == "crashy_0" and event["version"] == "1" and event["pid"] > 0
    assert "exited with status 3" in event["message"]
    assert st["events"][0]["time"] >= st["events"][-1]["time"]  # newest first
    wait_until(lambda: status(sserver)["workers"] and _worker(sserver, "crashy_0")["state"] == "READY", 30)
    assert _worker(sserver, "crashy_0")["restarts"] >= 1
    assert _worker(sserver, "crashy_0")["pid"] != event["pid"]


def _worker(srv: ServerProcess, instance: str) -> dict[str, Any]:
    (w,) = [w for w in status(srv)["workers"] if w["instance"] == instance]
    return w


def test_page_is_self_contained(sserver: ServerProcess) -> None:
    code, headers, body = _get(sserver, "/")
    assert code == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert page.startswith("<!doctype html>") and "v2/status" in page
    # no external asset: no src/href attributes, no URL other than the SVG namespace
    assert not re.search(r"\b(src|href)\s*=", page)
    assert set(re.findall(r"https?://[^\s\"'`]+", page)) == {"http://www.w3.org/2000/svg"}
    # HEAD too (load balancers), and Triton's routes are untouched
    req = urllib.request.Request(f"http://{sserver.url}/", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert _get(sserver, "/v2")[0] == 200 and _get(sserver, "/v2/health/live")[0] == 200
    assert _get(sserver, "/index.html")[0] == 404


def test_restricted_status(tmp_path: Any, fresh_server: list[ServerProcess]) -> None:
    srv = ServerProcess(make_repository(tmp_path / "repo", "add_sub"), "--http-restricted-api", "status:k=v")
    fresh_server.append(srv)
    srv.start()
    for path in ("/", "/v2/status"):
        code, _, body = _get(srv, path)
        assert code == 403 and b"This API is restricted, expecting header 'k'" in body
        assert _get(srv, path, {"k": "v"})[0] == 200
    # other groups are not restricted by it
    assert srv.client().infer("add_sub", _add_sub_inputs(httpclient)).as_numpy("OUTPUT0") is not None
    assert srv.terminate() == 0
