"""BLS (business logic scripting) through the real server: models that call other models with
``InferenceRequest.exec`` / ``async_exec`` / ``exec(decoupled=True)``, large tensors through
shared memory, errors as error responses, concurrency, and a model calling itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)

MODELS = (
    "bls_sync",
    "bls_async",
    "bls_decoupled",
    "bls_identity",
    "bls_self",
    "bls_outer",
    "ens_bls",
    "bls_batcher",
    "batcher",
    "add_sub",
    "repeat",
    "identity_fp32",
    "bls_timed",
    "latecheck",
    "stamps",
    "bls_slow_reader",
    "bls_async_decoupled",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, MODELS)


def _inputs(mod: object, arrays: dict[str, np.ndarray]) -> list[object]:
    out = []
    for name, a in arrays.items():
        i = mod.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))  # type: ignore[attr-defined]
        i.set_data_from_numpy(a)
        out.append(i)
    return out


def _add_sub_args(target: str, n: int = 4) -> dict[str, np.ndarray]:
    a = np.arange(n, dtype=np.float32)
    b = np.full(n, 2.0, dtype=np.float32)
    return {"INPUT0": a, "INPUT1": b, "MODEL_NAME": np.array([target.encode()], dtype=np.object_)}


@pytest.mark.parametrize("model", ["bls_sync", "bls_async"])
def test_bls_calls_another_model(server: ServerProcess, model: str) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        args = _add_sub_args("add_sub")
        r = c.infer(model, _inputs(httpclient, args))
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), args["INPUT0"] + args["INPUT1"])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), args["INPUT0"] - args["INPUT1"])
    finally:
        c.close()


def test_bls_errors_reach_the_calling_model(server: ServerProcess) -> None:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'missing' is not found"):
            c.infer("bls_sync", _inputs(grpcclient, _add_sub_args("missing")))
        with pytest.raises(InferenceServerException, match="unexpected shape for input 'INPUT0'"):
            c.infer("bls_sync", _inputs(grpcclient, _add_sub_args("add_sub", n=3)))
        # the calling model's worker is fine afterwards
        r = c.infer("bls_sync", _inputs(grpcclient, _add_sub_args("add_sub")))
        assert r.as_numpy("OUTPUT0") is not None
    finally:
        c.close()


def test_bls_into_a_decoupled_model(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        values = np.arange(1, 101, dtype=np.int32)
        r = c.infer("bls_decoupled", _inputs(httpclient, {"IN": values}))
        assert int(r.as_numpy("SUM")[0]) == int(values.sum()) and int(r.as_numpy("COUNT")[0]) == 100
        with pytest.raises(InferenceServerException, match="failed at element 2"):
            c.infer("bls_decoupled", _inputs(httpclient, {"IN": values[:5]}), parameters={"mode": "error_after_two"})
    finally:
        c.close()


def test_cancelling_a_decoupled_bls_call_stops_the_target(server: ServerProcess) -> None:
    """``ResponseIterator.cancel()``: the caller gets nothing more and the target model sees
    ``is_cancelled()`` (repeat's slow mode logs when it stops)."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        values = np.arange(1, 101, dtype=np.int32)
        params = {"mode": "slow", "cancel_after": 3}
        r = c.infer("bls_decoupled", _inputs(httpclient, {"IN": values}), parameters=params)
        assert (int(r.as_numpy("SUM")[0]), int(r.as_numpy("COUNT")[0])) == (6, 3)
        deadline = time.monotonic() + 10
        while "repeat stopped: cancelled after" not in server.log:
            assert time.monotonic() < deadline, "the target model never saw the cancellation"
            time.sleep(0.05)
        r = c.infer("bls_decoupled", _inputs(httpclient, {"IN": values[:4]}))  # still serving
        assert int(r.as_numpy("COUNT")[0]) == 4
    finally:
        c.close()


def test_large_tensors_travel_through_shared_memory(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        for n in (16, 1 << 18, 1 << 21):  # 64 B, 1 MiB, 8 MiB
            a = np.random.default_rng(n).random(n, dtype=np.float32)
            r = c.infer("bls_identity", _inputs(httpclient, {"INPUT0": a}))
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a)
    finally:
        c.close()


def test_inputs_stay_intact_while_a_timed_out_call_still_reads_them(server: ServerProcess) -> None:
    """A BLS call whose timeout passes while the target still reads its inputs in the
    caller's arena: the caller gets the deadline error at once, but must not reuse those
    bytes (for its next call's inputs) until the target is done with them."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        n = 1 << 16  # 256 KiB: in the caller's arena, read in place by the target
        with pytest.raises(InferenceServerException, match="did not complete within its deadline"):
            params = {"target": "latecheck", "delay_ms": 600, "timeout_us": 50_000}
            c.infer("bls_timed", _inputs(httpclient, {"INPUT0": np.ones(n, np.float32)}), parameters=params)
        # the next call's input, same size: it would land on the same bytes if they were free
        twos = np.full(n, 2.0, np.float32)
        r = c.infer("bls_timed", _inputs(httpclient, {"INPUT0": twos}), parameters={"target": "identity_fp32"})
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), twos)
        # latecheck (one instance) answers this once the timed-out request is done
        report = c.infer(
            "latecheck", _inputs(httpclient, {"INPUT0": np.zeros(1, np.float32)}), parameters={"report": 1}
        )
        assert report.as_numpy("OUTPUT0")[0] == 1.0, "the input changed under the model while it read it"
        # the kept blocks went back: many more calls of the same size still find room
        for _ in range(20):
            r = c.infer("bls_timed", _inputs(httpclient, {"INPUT0": twos}), parameters={"target": "identity_fp32"})
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), twos)
    finally:
        c.close()


def test_many_clients_at_once(server: ServerProcess) -> None:
    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for _ in range(5):
                args = _add_sub_args("add_sub")
                args["INPUT0"] = args["INPUT0"] + k
                r = c.infer("bls_sync" if k % 2 else "bls_async", _inputs(grpcclient, args))
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), args["INPUT0"] + args["INPUT1"])
        finally:
            c.close()

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(64)))


def test_a_model_calling_itself_fails_instead_of_waiting(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url, network_timeout=30)
    try:
        with pytest.raises(InferenceServerException, match="calls itself through BLS but has no other ready instance"):
            c.infer("bls_self", _inputs(httpclient, {"INPUT0": np.ones(4, np.float32)}))
    finally:
        c.close()


def test_bls_through_an_ensemble_that_uses_bls(server: ServerProcess) -> None:
    """client -> bls_outer (BLS) -> ens_bls (ensemble) -> bls_identity (BLS) -> identity_fp32."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for n in (8, 1 << 18):
            a = np.random.default_rng(n).random(n, dtype=np.float32)
            r = c.infer("bls_outer", _inputs(grpcclient, {"INPUT0": a}))
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a)
    finally:
        c.close()


def test_bls_requests_batch_with_client_requests(server: ServerProcess) -> None:
    """Two clients and two BLS calls reach "batcher" within its queue delay: one execution of
    four requests (its preferred size), and the statistics count one batch of four."""
    x = np.ones((1, 2), np.float32)

    def direct() -> int:
        c = httpclient.InferenceServerClient(server.url)
        try:
            return int(c.infer("batcher", _inputs(httpclient, {"INPUT0": x})).as_numpy("REQUESTS")[0, 0])
        finally:
            c.close()

    def via_bls() -> int:
        c = httpclient.InferenceServerClient(server.url)
        try:
            return int(c.infer("bls_batcher", _inputs(httpclient, {"INPUT0": x})).as_numpy("REQUESTS")[0, 0])
        finally:
            c.close()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(f) for f in (direct, via_bls, direct, via_bls)]
        assert [f.result() for f in futures] == [4, 4, 4, 4]
    c = httpclient.InferenceServerClient(server.url)
    try:
        stats = c.get_inference_statistics("batcher")["model_stats"][0]
    finally:
        c.close()
    assert [b["batch_size"] for b in stats["batch_stats"]] == [4]
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1


def test_a_slow_reader_holds_back_a_decoupled_target(server: ServerProcess) -> None:
    """``exec(decoupled=True)`` read slowly: the router sends at most its window (64) ahead
    of what the model took, so the target's sender waits instead of every response piling up
    in the calling worker; all of them arrive, in order, once the model reads on."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        n = 1000
        r = c.infer("bls_slow_reader", _inputs(httpclient, {"IN": np.zeros(n, np.int32)}))
        assert int(r.as_numpy("COUNT")[0]) == n
        early = int(r.as_numpy("EARLY")[0])
        # the window (64) + the target's own stream window to the router (64) + what is in flight
        assert early < 400, f"{early} of {n} responses were sent while the reader slept"
    finally:
        c.close()


def test_a_decoupled_call_left_unread_still_ends(server: ServerProcess) -> None:
    """The calling model stops reading (drops the iterator, no cancel): the window no longer
    holds the target back, which sends its whole stream (the rest is dropped)."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        mark = len(server.lines)
        r = c.infer(
            "bls_slow_reader", _inputs(httpclient, {"IN": np.zeros(1000, np.int32)}), parameters={"stop_after": 2}
        )
        assert int(r.as_numpy("COUNT")[0]) == 2
        server.wait_log("stamps: all 1000 sent", timeout_s=20, start=mark)
    finally:
        c.close()


def test_async_exec_of_a_decoupled_model(server: ServerProcess) -> None:
    """``await request.async_exec(decoupled=True)`` (python_backend's bls_decoupled async
    example): several at once with ``asyncio.gather``, each a ResponseIterator whose
    ``cancel()`` works as ``exec(decoupled=True)``'s does."""
    c = httpclient.InferenceServerClient(server.url)
    try:
        values = np.arange(1, 51, dtype=np.int32)
        r = c.infer("bls_async_decoupled", _inputs(httpclient, {"IN": values}))
        assert int(r.as_numpy("SUM")[0]) == 3 * int(values.sum())
        assert int(r.as_numpy("COUNT")[0]) == 3 * len(values)
        assert int(r.as_numpy("CANCELLED")[0]) == 1
    finally:
        c.close()
