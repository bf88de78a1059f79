"""Decoupled Python models (``model_transaction_policy { decoupled: true }``) through the real
server: any number of responses per request over gRPC ``ModelStreamInfer``, sent from
``execute`` or from threads after it returned, errors mid-stream, a worker that dies
mid-stream, a client that goes away, and Triton's answers on the endpoints that cannot stream.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("repeat", "add_sub", "stream_pid"))


def _inputs(values: list[int]) -> list[grpcclient.InferInput]:
    i = grpcclient.InferInput("IN", [len(values)], "INT32")
    i.set_data_from_numpy(np.array(values, dtype=np.int32))
    return [i]


class Stream:
    """A gRPC stream collecting (result, error) pairs."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.got.put((result, error)))

    def send(self, values: list[int], request_id: str = "", **kw: Any) -> None:
        self.client.async_stream_infer("repeat", _inputs(values), request_id=request_id, **kw)

    def take(self, n: int, timeout: float = 30.0) -> list[tuple[Any, Any]]:
        return [self.got.get(timeout=timeout) for _ in range(n)]

    def nothing_more(self, wait_s: float = 0.5) -> bool:
        try:
            self.got.get(timeout=wait_s)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


@pytest.fixture
def stream(server: ServerProcess) -> Iterator[Stream]:
    s = Stream(server)
    yield s
    s.close()


def _final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


@pytest.mark.parametrize("mode", ["thread", "execute"])
def test_one_response_per_element_in_order(stream: Stream, mode: str) -> None:
    stream.send([7, 8, 9], request_id="r1", parameters={"mode": mode})
    got = stream.take(3)
    assert [e for _, e in got] == [None, None, None]
    assert [int(r.as_numpy("OUT")[0]) for r, _ in got] == [7, 8, 9]
    assert [int(r.as_numpy("IDX")[0]) for r, _ in got] == [0, 1, 2]
    assert all(r.get_response().id == "r1" for r, _ in got)
    # "execute" puts the final flag on its last response; "thread" sends it alone afterwards,
    # and without enable_empty_final_response that flag reaches nobody
    assert [_final(r) for r, _ in got] == [False, False, mode == "execute"]
    assert stream.nothing_more()


def test_empty_final_response_when_asked(stream: Stream) -> None:
    stream.send([1, 2], request_id="e", enable_empty_final_response=True)
    got = stream.take(3)
    assert [_final(r) for r, _ in got] == [False, False, True]
    last = got[2][0].get_response()
    assert last.id == "e" and last.model_name == "repeat" and not last.outputs
    assert stream.nothing_more()


def test_zero_responses(stream: Stream) -> None:
    stream.send([], request_id="none", enable_empty_final_response=True)
    ((result, error),) = stream.take(1)
    assert error is None and _final(result) and not result.get_response().outputs
    stream.send([], request_id="silent")  # only the final flag, which is not sent
    stream.send([5], request_id="after", parameters={"mode": "execute"})
    ((result, error),) = stream.take(1)
    assert result.get_response().id == "after"


def test_a_thousand_responses(stream: Stream) -> None:
    values = list(range(1000))
    stream.send(values, request_id="big", enable_empty_final_response=True)
    got = stream.take(1001)
    assert all(e is None for _, e in got)
    assert [int(r.as_numpy("OUT")[0]) for r, _ in got[:1000]] == values
    assert _final(got[1000][0]) and not any(_final(r) for r, _ in got[:1000])


def test_a_thousand_responses_from_four_threads_at_once(stream: Stream) -> None:
    """Four requests in flight: the model's four threads send at once (their responses share
    the worker's writes); each request's arrive in order, its final flag last."""
    for k in range(4):
        stream.send([k * 10_000 + i for i in range(1000)], request_id=f"t{k}", enable_empty_final_response=True)
    got = stream.take(4 * 1001, timeout=60)
    by_id: dict[str, list[Any]] = {}
    for r, e in got:
        assert e is None
        by_id.setdefault(r.get_response().id, []).append(r)
    assert sorted(by_id) == [f"t{k}" for k in range(4)]
    for k in range(4):
        rs = by_id[f"t{k}"]
        assert [int(r.as_numpy("IDX")[0]) for r in rs[:1000]] == list(range(1000))
        assert [int(r.as_numpy("OUT")[0]) for r in rs[:1000]] == [k * 10_000 + i for i in range(1000)]
        assert [_final(r) for r in rs] == [False] * 1000 + [True]
    assert stream.nothing_more()


def test_several_streaming_requests_interleave(stream: Stream) -> None:
    for k in range(8):
        stream.send([k] * 5, request_id=str(k), parameters={"mode": "slow"}, enable_empty_final_response=True)
    got = stream.take(8 * 6, timeout=60)
    by_id: dict[str, list[Any]] = {}
    for r, e in got:
        assert e is None
        by_id.setdefault(r.get_response().id, []).append(r)
    assert sorted(by_id) == [str(k) for k in range(8)]
    for k, rs in by_id.items():
        assert [int(r.as_numpy("IDX")[0]) for r in rs[:5]] == [0, 1, 2, 3, 4]
        assert [int(r.as_numpy("OUT")[0]) for r in rs[:5]] == [int(k)] * 5
        assert _final(rs[5])


def test_error_mid_stream(stream: Stream) -> None:
    stream.send([1, 2, 3, 4], request_id="bad", parameters={"mode": "error_after_two"})
    got = stream.take(3)
    assert [e for _, e in got[:2]] == [None, None]
    assert got[2][1] is not None and "failed at element 2" in str(got[2][1])
    stream.send([6], request_id="ok", parameters={"mode": "execute"})  # the stream goes on
    ((result, error),) = stream.take(1)
    assert error is None and int(result.as_numpy("OUT")[0]) == 6


def test_worker_killed_mid_stream_ends_the_stream_with_an_error(server: ServerProcess) -> None:
    s = Stream(server)
    try:
        s.send([1, 2, 3, 4], request_id="dies", parameters={"mode": "die_after_two"})
        got = s.take(3)
        assert [e for _, e in got[:2]] == [None, None]
        assert got[2][1] is not None and "exited with status 3" in str(got[2][1]), got[2][1]
    finally:
        s.close()
    _wait_ready(server)
    s = Stream(server)  # the worker was replaced: streams work again
    try:
        s.send([3], parameters={"mode": "execute"})
        ((result, error),) = s.take(1)
        assert error is None and int(result.as_numpy("OUT")[0]) == 3
    finally:
        s.close()


def test_client_going_away_mid_stream_leaves_nothing_behind(server: ServerProcess) -> None:
    s = Stream(server)
    s.send(list(range(200)), parameters={"mode": "slow"})
    s.take(2)
    t0 = time.monotonic()
    s.client.stop_stream(cancel_requests=True)  # the call is cancelled under the open stream
    s.client.close()
    assert time.monotonic() - t0 < 2.0, "the router should end a cancelled stream at once"
    s = Stream(server)
    try:
        s.send([42], parameters={"mode": "execute"})
        ((result, error),) = s.take(1)
        assert error is None and int(result.as_numpy("OUT")[0]) == 42
    finally:
        s.close()


def test_unary_grpc_and_http_refuse_decoupled_models_as_triton(server: ServerProcess) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            g.infer("repeat", _inputs([1]))
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "ModelInfer RPC doesn't support models with decoupled transaction policy" in str(info.value)
    finally:
        g.close()
    h = httpclient.InferenceServerClient(server.url)
    try:
        i = httpclient.InferInput("IN", [1], "INT32")
        i.set_data_from_numpy(np.array([1], dtype=np.int32))
        with pytest.raises(InferenceServerException) as hinfo:
            h.infer("repeat", [i])
        assert "HTTP end point doesn't support models with decoupled transaction policy" in str(hinfo.value)
        assert hinfo.value.status() == "501"
    finally:
        h.close()


def test_not_decoupled_model_on_a_stream_is_marked_final(server: ServerProcess) -> None:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue[Any] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        a = np.arange(4, dtype=np.float32)
        ins = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(a)
        c.async_stream_infer("add_sub", ins)
        result, error = got.get(timeout=30)
        assert error is None and _final(result)
    finally:
        c.stop_stream()
        c.close()


def _wait_ready(server: ServerProcess, timeout_s: float = 30.0) -> None:
    h = httpclient.InferenceServerClient(server.url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if h.is_model_ready("repeat"):
                    return
            except InferenceServerException:
                pass
            time.sleep(0.1)
        raise AssertionError("repeat did not come back")
    finally:
        h.close()


def test_streams_spread_over_instances(server: ServerProcess) -> None:
    """A decoupled request whose ``execute`` returned keeps its instance busy until its final
    response: a second stream meanwhile goes to the other instance."""
    streams = [Stream(server), Stream(server)]
    try:
        for k, s in enumerate(streams):
            s.client.async_stream_infer("stream_pid", _inputs([0] * 10), request_id=f"s{k}")
            time.sleep(0.05)  # the first one's execute has returned
        pids = set()
        for s in streams:
            for result, error in s.take(10):
                assert error is None, error
                pids.add(int(result.as_numpy("PID")[0]))
        assert pids == set(server.worker_pids("stream_pid")), pids
    finally:
        for s in streams:
            s.close()
