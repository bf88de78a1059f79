"""The sequence batcher through the real server: a Python accumulator driven by many
interleaved sequences over HTTP, gRPC and a gRPC stream, integer and string ids, the
backlog when slots are full, idle timeouts, START/END mistakes, and a crash mid-sequence."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until


def _variant(repo: Path, name: str, **changes: str) -> None:
    shutil.copytree(repo / "accumulator", repo / name)
    cfg = (repo / name / "config.pbtxt").read_text().replace('name: "accumulator"', f'name: "{name}"')
    for old, new in changes.items():
        assert old in cfg
        cfg = cfg.replace(old, new)
    (repo / name / "config.pbtxt").write_text(cfg)


@pytest.fixture(scope="module")
def sserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "accumulator")
    a = {"max_sequence_idle_microseconds: 2000000": "max_sequence_idle_microseconds: 300000"}
    _variant(repo, "acc_idle", **a)
    _variant(repo, "acc_string", **{"data_type: TYPE_UINT64 } ]": "data_type: TYPE_STRING } ]"})
    _variant(repo, "acc_one_slot", **{"max_batch_size: 4": "max_batch_size: 1", "count: 2": "count: 1"})
    _variant(repo, "acc_rows", **{"count: 2": "count: 1"})
    oldest = (
        "max_sequence_idle_microseconds: 2000000\n  oldest { max_candidate_sequences: 8 "
        "preferred_batch_size: [ 3 ] max_queue_delay_microseconds: 400000 }"
    )
    _variant(
        repo, "acc_oldest",
        **{"max_batch_size: 4": "max_batch_size: 3", "count: 2": "count: 1",
           "max_sequence_idle_microseconds: 2000000": oldest},
    )  # fmt: skip
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log
    assert not srv.segments()


def _input(mod: Any, value: int) -> Any:
    i = mod.InferInput("INPUT", [1, 1], "INT32")
    i.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return i


def _send(client: Any, model: str, sid: int | str, value: int, start: bool = False, end: bool = False) -> Any:
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    r = client.infer(model, [_input(mod, value)], sequence_id=sid, sequence_start=start, sequence_end=end)
    return int(r.as_numpy("OUTPUT")[0, 0]), int(r.as_numpy("CORRID_SEEN")[0, 0])


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_interleaved_sequences(sserver: ServerProcess, proto: str) -> None:
    if proto == "http":
        client: Any = httpclient.InferenceServerClient(sserver.url)
    else:
        client = grpcclient.InferenceServerClient(sserver.grpc_url)
    try:
        ids = [1000 + i for i in range(6)]  # 6 sequences over 2 instances x 4 slots
        values = {sid: [(sid % 7) + k for k in range(5)] for sid in ids}
        for step in range(5):
            for sid in ids:
                total, seen = _send(client, "accumulator", sid, values[sid][step], start=step == 0, end=step == 4)
                assert (total, seen) == (sum(values[sid][: step + 1]), sid)
    finally:
        client.close()


def test_string_ids_and_stream(sserver: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(sserver.grpc_url)
    responses: queue.Queue[Any] = queue.Queue()

    def on_response(result: Any, error: Any) -> None:
        responses.put(error or result)

    client.start_stream(callback=on_response)
    try:
        ids = ["alpha", "b", "sequence-three"]
        for step in range(4):
            for sid in ids:
                client.async_stream_infer(
                    "acc_string", [_input(grpcclient, step + 1)], request_id=f"{sid}/{step}",
                    sequence_id=sid, sequence_start=step == 0, sequence_end=step == 3,
                )  # fmt: skip
        got = {}
        for _ in range(len(ids) * 4):
            r = responses.get(timeout=30)
            assert not isinstance(r, Exception), r
            got[r.get_response().id] = (int(r.as_numpy("OUTPUT")[0, 0]), int(r.as_numpy("CORRID_SEEN")[0, 0]))
        for sid in ids:
            for step in range(4):
                assert got[f"{sid}/{step}"] == (sum(range(1, step + 2)), len(sid))
    finally:
        client.stop_stream()
        client.close()
    h = httpclient.InferenceServerClient(sserver.url)
    try:
        with pytest.raises(InferenceServerException) as err:
            _send(h, "accumulator", "text-id", 1, start=True)
        assert err.value.message() == (
            "[request id: <id_unknown>] sequence batching control 'CORRID' data-type is 'BYTES', but model "
            "'accumulator' expects 'UINT64'"
        )
    finally:
        h.close()


def test_backlog_when_slots_are_full(sserver: ServerProcess) -> None:
    """One instance with one slot: a second sequence's START waits until the first ends."""
    g = grpcclient.InferenceServerClient(sserver.grpc_url)
    h = httpclient.InferenceServerClient(sserver.url)
    done = threading.Event()
    result: list[Any] = []
    try:
        _send(h, "acc_one_slot", 1, 5, start=True)

        def second() -> None:
            result.append(_send(g, "acc_one_slot", 2, 7, start=True, end=True))
            done.set()

        t = threading.Thread(target=second)
        t.start()
        assert not done.wait(0.5)  # waiting for a slot
        assert _send(h, "acc_one_slot", 1, 1, end=True) == (6, 1)
        assert done.wait(30)
        t.join()
        assert result == [(7, 2)]
    finally:
        g.close()
        h.close()


def test_sequence_mistakes(sserver: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(sserver.url)
    try:
        with pytest.raises(InferenceServerException, match="must specify a non-zero or non-empty correlation ID"):
            h.infer("accumulator", [_input(httpclient, 1)])
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            _send(h, "accumulator", 424242, 1, end=True)  # END for a sequence never started
        # START without END: a later START of the same id begins again from zero
        assert _send(h, "accumulator", 77, 5, start=True) == (5, 77)
        assert _send(h, "accumulator", 77, 1, start=True) == (1, 77)
        assert _send(h, "accumulator", 77, 1, end=True) == (2, 77)
        # an idle sequence is released; its next request says so
        assert _send(h, "acc_idle", 5, 1, start=True) == (1, 5)
        time.sleep(1.0)
        with pytest.raises(InferenceServerException, match="idle"):
            _send(h, "acc_idle", 5, 1)
        assert _send(h, "acc_idle", 5, 3, start=True, end=True) == (3, 5)
    finally:
        h.close()


def test_crash_mid_sequence(sserver: ServerProcess) -> None:
    h = httpclient.InferenceServerClient(sserver.url)
    try:
        assert _send(h, "accumulator", 9, 2, start=True) == (2, 9)
        with pytest.raises(InferenceServerException) as err:
            _send(h, "accumulator", 9, -1)  # the model kills its worker
        assert err.value.status() == "503"
        # the sequence ended with its instance: Triton's text (the log says why)
        with pytest.raises(InferenceServerException, match="sequence 9 to model 'accumulator' must specify the START"):
            _send(h, "accumulator", 9, 1)
        sserver.wait_log(r"sequence 9 of model 'accumulator' ended: its instance failed")
        wait_until(lambda: h.is_model_ready("accumulator") and len(sserver.worker_pids("accumulator")) >= 3)
        assert _send(h, "accumulator", 9, 4, start=True, end=True) == (4, 9)
        stats = h.get_inference_statistics("accumulator")["model_stats"][0]["inference_stats"]
        assert stats["success"]["count"] > 0 and stats["fail"]["count"] >= 2
    finally:
        h.close()


def test_sequences_share_executions(sserver: ServerProcess) -> None:
    """Requests of different sequences waiting for one instance run as one batch."""
    h = httpclient.InferenceServerClient(sserver.url)
    before = h.get_inference_statistics("acc_string")["model_stats"][0]
    errors: list[Any] = []

    def run_sequence(sid: str) -> None:
        g = grpcclient.InferenceServerClient(sserver.grpc_url)
        try:
            for step in range(3):
                r = g.infer(
                    "acc_string", [_input(grpcclient, 1)], sequence_id=sid,
                    sequence_start=step == 0, sequence_end=step == 2, parameters={"delay_ms": 100},
                )  # fmt: skip
                if int(r.as_numpy("OUTPUT")[0, 0]) != step + 1:
                    errors.append((sid, step, r.as_numpy("OUTPUT")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            g.close()

    threads = [threading.Thread(target=run_sequence, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = h.get_inference_statistics("acc_string")["model_stats"][0]
    with pytest.raises(InferenceServerException, match="must specify batch-size 1 due to requirements of sequence"):
        i = httpclient.InferInput("INPUT", [2, 1], "INT32")
        i.set_data_from_numpy(np.ones((2, 1), dtype=np.int32))
        h.infer("acc_string", [i], sequence_id="x", sequence_start=True)
    h.close()
    assert not errors, errors
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 18 and executions < 18, (inferences, executions)


def test_direct_strategy_pins_batch_rows_to_slots(sserver: ServerProcess) -> None:
    """Direct strategy: a sequence's requests take its slot's batch row; empty rows below it
    are null requests (READY false), counted in the batch size but not as inferences."""
    g = grpcclient.InferenceServerClient(sserver.grpc_url)

    def send(sid: int, value: int, start: bool = False, end: bool = False) -> tuple[int, int, int]:
        r = g.infer("acc_rows", [_input(grpcclient, value)], sequence_id=sid, sequence_start=start, sequence_end=end)
        return tuple(int(r.as_numpy(n)[0, 0]) for n in ("OUTPUT", "ROW", "NULLS"))  # type: ignore[return-value]

    try:
        before = g.get_inference_statistics("acc_rows", as_json=True)["model_stats"][0]
        assert send(501, 1, start=True) == (1, 0, 0)  # slot 0
        assert send(502, 2, start=True) == (2, 1, 1)  # slot 1: row 1, a null request in row 0
        assert send(503, 3, start=True) == (3, 2, 2)  # slot 2
        assert send(502, 1, end=True) == (3, 1, 1)  # slot 1 is free again
        assert send(503, 4) == (7, 2, 2)  # still row 2, rows 0 and 1 null
        assert send(501, 5) == (6, 0, 0)
        assert send(504, 6, start=True) == (6, 1, 1)  # the freed slot 1
        after = g.get_inference_statistics("acc_rows", as_json=True)["model_stats"][0]
    finally:
        g.close()
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 7  # nulls not counted
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert sizes == {1: 2, 2: 3, 3: 2}, sizes  # executions by rows, null rows included


def test_oldest_strategy_waits_for_preferred_batches(sserver: ServerProcess) -> None:
    """oldest: 8 candidate sequences on one instance, batches of at most max_batch_size 3,
    a batch waits up to 400 ms for the preferred size 3."""
    h = httpclient.InferenceServerClient(sserver.url)
    before = h.get_inference_statistics("acc_oldest")["model_stats"][0]
    errors: list[Any] = []
    go = threading.Barrier(7)

    def run_sequence(sid: int) -> None:
        g = grpcclient.InferenceServerClient(sserver.grpc_url)
        try:
            go.wait()
            for step in range(2):
                total, seen = _send(g, "acc_oldest", sid, sid, start=step == 0, end=step == 1)
                if (total, seen) != (sid * (step + 1), sid):
                    errors.append((sid, step, total, seen))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            g.close()

    threads = [threading.Thread(target=run_sequence, args=(100 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    after = h.get_inference_statistics("acc_oldest")["model_stats"][0]
    h.close()
    assert not errors, errors
    sizes = {int(b["batch_size"]): b["compute_infer"]["count"] for b in after["batch_stats"]}
    old = {int(b["batch_size"]): b["compute_infer"]["count"] for b in before["batch_stats"]}
    new = {k: v - old.get(k, 0) for k, v in sizes.items() if v - old.get(k, 0)}
    assert after["inference_count"] - before["inference_count"] == 12
    assert max(new) <= 3, new  # never more than max_batch_size, though 8 sequences may be candidates
    assert new.get(3, 0) >= 3, new  # 6 sequences x 2 steps: mostly full preferred batches
    assert elapsed < 5, elapsed


def test_implicit_state(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    """The server carries SUM_OUT of one request into SUM_IN of the next; clients never see
    the state, and each sequence has its own."""
    repo = make_repository(tmp_path / "repo", "acc_state")
    srv = ServerProcess(repo).start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        for step, (a, b) in enumerate([(1, 10), (2, 20), (3, 30)]):
            ra = h.infer("acc_state", [_input(httpclient, a)], sequence_id=1, sequence_start=step == 0)
            rb = g.infer("acc_state", [_input(grpcclient, b)], sequence_id=2, sequence_start=step == 0,
                         outputs=[grpcclient.InferRequestedOutput("OUTPUT")])  # fmt: skip
            assert int(ra.as_numpy("OUTPUT")[0, 0]) == sum(x for x, _ in [(1, 10), (2, 20), (3, 30)][: step + 1])
            assert int(rb.as_numpy("OUTPUT")[0, 0]) == sum(y for _, y in [(1, 10), (2, 20), (3, 30)][: step + 1])
            assert [o["name"] for o in ra.get_response()["outputs"]] == ["OUTPUT"]
            assert [o.name for o in rb.get_response().outputs] == ["OUTPUT"]
        r = h.infer("acc_state", [_input(httpclient, 5)], sequence_id=1, sequence_start=True, sequence_end=True)
        assert int(r.as_numpy("OUTPUT")[0, 0]) == 5  # START resets the state
        # Triton counts the inputs before it looks at their names (its text, quirks included)
        with pytest.raises(InferenceServerException, match=r"expected 1 inputs but got 2 inputs for model 'acc_state'"):
            i = httpclient.InferInput("SUM_IN", [1, 1], "INT32")
            i.set_data_from_numpy(np.ones((1, 1), dtype=np.int32))
            h.infer("acc_state", [_input(httpclient, 1), i], sequence_id=3, sequence_start=True)
    finally:
        h.close()
        g.close()
    assert srv.terminate() == 0
