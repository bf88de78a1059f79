"""Streams over lanes: with frontend processes, a gRPC stream's requests of a decoupled model
(and of a model that is not, answered once) go from the frontend straight to a worker, whose
responses come back on the lane without crossing the router. Proven as
``test_frontend_lanes.py`` proves it for single requests: the router is stopped (SIGSTOP)
while streams are answered. Then what only the lane does for a stream: flow control (1000
responses, far more than the worker's window of 64), the statistics the router keeps, large
responses through the worker's arena given back over the lane, a worker killed mid-stream, a
client that goes away mid-stream, and unloading the model while streams run."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess, make_repository, wait_until
from tests.e2e.test_frontend_lanes import FRONTENDS, ROUTES_S, SMALL_ARENAS, RouterStopped

pytestmark = pytest.mark.timeout(180)

BIG_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            kib = int(json.loads(request.parameters() or "{}").get("kib", 512))
            sender = request.get_response_sender()
            for i in range(n):
                out = np.full(kib << 8, i, dtype=np.float32)  # 512 KiB: in the worker's arena
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
BIG_CONFIG = """
name: "big_stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

READER_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            call = pb_utils.InferenceRequest(
                model_name="big_stream", requested_output_names=["OUT"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "N")], parameters={"kib": 2048},
            )
            taken = 0
            for answer in call.exec(decoupled=True):
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                o = pb_utils.get_output_tensor_by_name(answer, "OUT")
                if o is not None:
                    if int(o.as_numpy()[0]) != taken:
                        raise pb_utils.TritonModelException(f"response {taken} was {o.as_numpy()[0]}")
                    taken += 1
                    time.sleep(0.02)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TAKEN", np.array([taken], np.int32))]))
        return out
"""
READER_CONFIG = """
name: "big_reader"
backend: "python"
max_batch_size: 0
input [ { name: "N", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "TAKEN", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "repeat", "identity_fp32")
    (repo / "big_stream" / "1").mkdir(parents=True)
    (repo / "big_stream" / "1" / "model.py").write_text(BIG_MODEL)
    (repo / "big_stream" / "config.pbtxt").write_text(BIG_CONFIG)
    (repo / "big_reader" / "1").mkdir(parents=True)
    (repo / "big_reader" / "1" / "model.py").write_text(READER_MODEL)
    (repo / "big_reader" / "config.pbtxt").write_text(READER_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        repo, *FRONTENDS, *SMALL_ARENAS, "--model-control-mode", "explicit", "--load-model", "*"
    ).start()
    time.sleep(ROUTES_S)
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()


class Stream:
    """A tritonclient gRPC stream whose responses land in a queue."""

    def __init__(self, srv: ServerProcess) -> None:
        self.client = grpcclient.InferenceServerClient(srv.grpc_url)
        self.got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.got.put((result, error)))

    def send(self, model: str, inputs: list[Any], **kwargs: Any) -> None:
        self.client.async_stream_infer(model, inputs, enable_empty_final_response=True, **kwargs)

    def until_final(self, timeout_s: float = 30.0) -> list[tuple[Any, Any]]:
        """The responses up to the one marked final (or an error)."""
        out = []
        deadline = time.monotonic() + timeout_s
        while True:
            result, error = self.got.get(timeout=max(0.1, deadline - time.monotonic()))
            out.append((result, error))
            if error is not None:
                return out
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return out

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def _values(n: int) -> list[Any]:
    t = grpcclient.InferInput("IN", [n], "INT32")
    t.set_data_from_numpy(np.arange(n, dtype=np.int32) + 7)
    return [t]


def _repeated(responses: list[tuple[Any, Any]]) -> list[tuple[int, int]]:
    out = []
    for result, error in responses:
        assert error is None, error
        if result.as_numpy("OUT") is not None:
            out.append((int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
    return out


@pytest.mark.parametrize("mode", ["thread", "execute"])
def test_decoupled_streams_are_answered_while_the_router_is_stopped(server: ServerProcess, mode: str) -> None:
    """0, 1 and 1000 responses (the worker waits for the frontend's acknowledgements past
    64), and a model that is not decoupled on the same stream, with the router stopped."""
    s = Stream(server)
    try:
        with RouterStopped(server):
            for n in (0, 1, 1000):
                s.send("repeat", _values(n), parameters={"mode": mode})
                assert _repeated(s.until_final()) == [(7 + i, i) for i in range(n)]
            x = grpcclient.InferInput("INPUT0", [4], "FP32")
            x.set_data_from_numpy(np.arange(4, dtype=np.float32))
            s.send("identity_fp32", [x])
            ((result, error),) = s.until_final()
            assert error is None and np.array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    finally:
        s.close()


def _events(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    return [json.loads(b[len("data: ") :]) for b in resp.text.split("\n\n") if b.strip()]


def test_generate_is_answered_while_the_router_is_stopped(server: ServerProcess) -> None:
    """A frontend answers ``/generate_stream`` of a decoupled model (its responses over the
    lane) and ``/generate`` of another model itself, from the configuration its route brought."""
    url = f"http://{server.url}/v2/models"
    with RouterStopped(server):
        for mode in ("thread", "execute", "error_after_two"):
            events = _events(
                requests.post(f"{url}/repeat/generate_stream", json={"IN": [5, 6, 7], "mode": mode}, timeout=10)
            )
            if mode == "error_after_two":
                assert [(e.get("OUT"), e.get("IDX")) for e in events[:2]] == [(5, 0), (6, 1)]
                assert events[2:] == [{"error": "failed at element 2"}]
            else:
                assert [(e["OUT"], e["IDX"]) for e in events] == [(5, 0), (6, 1), (7, 2)]
                assert all(e["model_name"] == "repeat" and e["model_version"] == "1" for e in events)
        r = requests.post(f"{url}/identity_fp32/generate", json={"INPUT0": [1.5, 2.5]}, timeout=10)
        assert r.status_code == 200 and r.json()["OUTPUT0"] == [1.5, 2.5], r.text


def _stats(srv: ServerProcess, model: str) -> dict[str, Any]:
    r = requests.get(f"http://{srv.url}/v2/models/{model}/stats", timeout=10)
    r.raise_for_status()
    (st,) = r.json()["model_stats"]
    return dict(st)


def test_statistics_count_lane_streams(server: ServerProcess) -> None:
    """As the router counts a decoupled request: one success and one execution per request."""
    before = _stats(server, "repeat")
    s = Stream(server)
    try:
        with RouterStopped(server):
            for _ in range(5):
                s.send("repeat", _values(3))
                assert len(_repeated(s.until_final())) == 3
    finally:
        s.close()
    after = _stats(server, "repeat")
    assert after["execution_count"] == before["execution_count"] + 5
    b, a = before["inference_stats"], after["inference_stats"]
    for key in ("success", "compute_infer"):
        assert a[key]["count"] == b[key]["count"] + 5, key
    assert a["fail"]["count"] == b["fail"]["count"]


def test_large_responses_go_back_to_the_worker_arena(server: ServerProcess) -> None:
    """300 responses of 512 KiB each (150 MiB) through a worker arena of 64 MiB at most: every
    block the frontend read is given back over the lane (else the arena runs out and responses
    fail)."""
    s = Stream(server)
    try:
        with RouterStopped(server):
            for _ in range(3):
                n = grpcclient.InferInput("N", [1], "INT32")
                n.set_data_from_numpy(np.array([100], dtype=np.int32))
                s.send("big_stream", [n])
                got = s.until_final()
                assert all(e is None for _, e in got), [str(e) for _, e in got if e is not None][:1]
                outs = [r.as_numpy("OUT") for r, _ in got if r.as_numpy("OUT") is not None]
                assert len(outs) == 100
                assert all(o.shape == (1 << 17,) and o[0] == i and o[-1] == i for i, o in enumerate(outs))
    finally:
        s.close()


@pytest.mark.parametrize("where", ["router", "lanes", "link"])
def test_large_responses_to_a_slow_reader_wait_for_it(server: ServerProcess, repo: Path, where: str) -> None:
    """60 responses of 2 MiB to a client that reads one every 20 ms, through a worker arena
    of 64 MiB at most: the sender waits for the reader (``proto.streamflow.BYTES``) instead
    of filling the arena (64 unread responses of 2 MiB would need 128 MiB: the 33rd failed
    with 'shared memory ... full', through the router, over a lane, and relayed by the
    router to a frontend process without lanes: ``link``)."""
    if where == "lanes":
        srv = server
    elif where == "router":
        srv = ServerProcess(repo, *SMALL_ARENAS).start()
    else:
        srv = ServerProcess(repo, *FRONTENDS, *SMALL_ARENAS, "--frontend-lanes=false").start()
    s = Stream(srv)
    try:
        n = grpcclient.InferInput("N", [1], "INT32")
        n.set_data_from_numpy(np.array([60], dtype=np.int32))
        s.send("big_stream", [n], parameters={"kib": 2048})
        got = []
        deadline = time.monotonic() + 60
        while True:
            result, error = s.got.get(timeout=max(0.1, deadline - time.monotonic()))
            assert error is None, (error.status(), error.message(), error.debug_details())
            got.append(result)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
            time.sleep(0.02)
        outs = [r.as_numpy("OUT") for r in got if r.as_numpy("OUT") is not None]
        assert len(outs) == 60
        assert all(o.shape == (1 << 19,) and o[0] == i and o[-1] == i for i, o in enumerate(outs))
    finally:
        s.close()
        if srv is not server:
            assert srv.terminate() == 0, srv.log
            assert not srv.segments()


def test_large_responses_to_a_slow_bls_reader_wait_for_it(server: ServerProcess) -> None:
    """A model reading 60 responses of 2 MiB from ``exec(decoupled=True)``, one every 20 ms,
    through a 64 MiB arena: the router sends them only as the caller's acknowledgements and
    the byte budget allow (``proto.streamflow``) instead of filling the target's arena."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        n = grpcclient.InferInput("N", [1], "INT32")
        n.set_data_from_numpy(np.array([60], dtype=np.int32))
        assert c.infer("big_reader", [n], client_timeout=60).as_numpy("TAKEN").tolist() == [60]
    finally:
        c.close()


def test_a_worker_killed_mid_stream_ends_it_with_an_error(server: ServerProcess) -> None:
    """The frontend ends the stream itself (the router is stopped): the responses sent before,
    then an error naming the dead worker; the router restarts it and streams work again."""
    pids = server.worker_pids("repeat")
    s = Stream(server)
    try:
        with RouterStopped(server):
            s.send("repeat", _values(200), parameters={"mode": "slow"})
            first = [s.got.get(timeout=10) for _ in range(3)]
            os.kill(pids[-1], signal.SIGKILL)
            rest = s.until_final()
        assert [e for _, e in first] == [None, None, None]
        *before, (_, error) = rest
        assert error is not None and "died while executing the request" in str(error), error
        assert all(e is None for _, e in before)
    finally:
        s.close()
    wait_until(lambda: len(server.worker_pids("repeat")) > len(pids), timeout_s=60)
    time.sleep(ROUTES_S)

    def streams() -> bool:
        t = Stream(server)
        try:
            t.send("repeat", _values(3))
            return _repeated(t.until_final(10)) == [(7, 0), (8, 1), (9, 2)]
        except (AssertionError, queue.Empty):
            return False
        finally:
            t.close()

    wait_until(streams, timeout_s=30)


def test_a_client_that_goes_away_mid_stream_cancels_it(server: ServerProcess) -> None:
    """The model sees ``is_cancelled()`` while the router is stopped: the router never had the
    request, so only the lane can have told the worker (without it the model would wait for
    acknowledgements after 64 responses, for ever). It says so in its log, which the router
    reads once it runs again."""
    before = server.log.count("repeat stopped: cancelled")
    with RouterStopped(server):
        s = Stream(server)
        s.send("repeat", _values(500), parameters={"mode": "slow"})
        s.got.get(timeout=10)
        s.close()  # cancels the stream
        time.sleep(1.0)
    wait_until(lambda: server.log.count("repeat stopped: cancelled") > before, timeout_s=10)
    stopped = re.findall(r"repeat stopped: cancelled after (\d+) responses", server.log)[-1]
    assert int(stopped) < 64, stopped


def test_unloading_the_model_while_streams_run(server: ServerProcess) -> None:
    """Every stream ends (all its responses, or an error), none hangs; loaded again, the model
    streams over lanes again."""
    stop = threading.Event()
    outcomes: list[str] = []

    def streamer() -> None:
        s = Stream(server)
        try:
            while not stop.is_set():
                s.send("repeat", _values(20))
                got = s.until_final(30)
                errors = [str(e) for _, e in got if e is not None]
                outcomes.append(errors[0] if errors else ("ok" if len(_repeated(got)) == 20 else "short"))
        finally:
            s.close()

    threads = [threading.Thread(target=streamer) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.5)
        requests.post(f"http://{server.url}/v2/repository/models/repeat/unload", timeout=30).raise_for_status()
        time.sleep(0.5)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a stream hung"
    assert "ok" in outcomes
    assert "short" not in outcomes
    assert not any("died" in o for o in outcomes), outcomes
    requests.post(f"http://{server.url}/v2/repository/models/repeat/load", timeout=60).raise_for_status()
    time.sleep(ROUTES_S)
    s = Stream(server)
    try:
        with RouterStopped(server):
            s.send("repeat", _values(2))
            assert _repeated(s.until_final()) == [(7, 0), (8, 1)]
    finally:
        s.close()


def test_a_stream_running_at_unload_ends_whole(server: ServerProcess) -> None:
    """Unloading a decoupled model while its thread streams on a lane: the worker says
    ``LaneBye`` (no new requests) but keeps the lane open until the model's ``finalize``
    (which joins its threads) returns, so the stream gets every response, as through the
    router; then the model loads again."""
    s = Stream(server)
    try:
        s.send("repeat", _values(30), parameters={"mode": "slow"})  # 0.6 s of responses
        first = s.got.get(timeout=10)
        requests.post(f"http://{server.url}/v2/repository/models/repeat/unload", timeout=30).raise_for_status()
        got = [first, *s.until_final(30)]
    finally:
        s.close()
    assert _repeated(got) == [(7 + i, i) for i in range(30)]
    requests.post(f"http://{server.url}/v2/repository/models/repeat/load", timeout=60).raise_for_status()
    time.sleep(ROUTES_S)


def test_sigterm_lets_a_lane_stream_finish(repo: Path) -> None:
    """A stream the router never saw (it went over a lane) still gets every response and its
    final one when the server is told to stop mid-stream; then everything exits cleanly."""
    srv = ServerProcess(repo, *FRONTENDS, "--model-control-mode", "explicit", "--load-model", "repeat").start()
    try:
        time.sleep(ROUTES_S)
        s = Stream(srv)
        try:
            s.send("repeat", _values(60), parameters={"mode": "slow"})  # 1.2 s of responses
            first = s.got.get(timeout=10)
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGTERM)
            got = [first, *s.until_final(30)]
        finally:
            s.close()
        assert _repeated(got) == [(7 + i, i) for i in range(60)]
        assert srv.terminate() == 0, srv.log
        assert "server stopped" in srv.log
        assert not srv.segments()
    finally:
        srv.terminate()
