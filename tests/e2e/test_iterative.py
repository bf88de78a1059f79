"""Iterative sequences (``sequence_batching { iterative_sequence: true }``) and request
rescheduling (``request.set_release_flags(TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)``) through
the real server: a request runs until the model stops rescheduling it, rescheduled requests
share batches with others at other iterations (continuous batching), a decoupled model
streams a response per iteration, slots are freed however a request ends, and a model
without iterative sequences gets Triton's error."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)
SLOTS = 8
"""max_batch_size of the iterate model: the sequences one instance runs at once."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from served(tmp_path_factory, ("iterate", "iterate_stream", "reschedule_unconfigured"))


def _iterate(client: Any, module: Any, n: int, **kw: Any) -> tuple[int, int]:
    x = module.InferInput("N", [1, 1], "INT32")
    x.set_data_from_numpy(np.array([[n]], np.int32))
    result = client.infer("iterate", [x], **kw)
    return int(result.as_numpy("ITERATIONS")[0, 0]), int(result.as_numpy("PEAK")[0, 0])


def _executions(server: ServerProcess) -> int:
    c = httpclient.InferenceServerClient(server.url)
    try:
        return int(c.get_inference_statistics("iterate")["model_stats"][0]["execution_count"])
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_runs_until_the_model_stops_rescheduling_it(server: ServerProcess, protocol: str) -> None:
    module: Any = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.url if protocol == "http" else server.grpc_url)
    try:
        before = _executions(server)
        assert _iterate(client, module, 5) == (5, 1)
        assert _executions(server) - before == 5
        assert _iterate(client, module, 1) == (1, 1)  # answered on its first execution
    finally:
        client.close()


def test_rescheduled_requests_share_batches(server: ServerProcess) -> None:
    """Six requests of 40 iterations sent together: each is answered after its 40, and
    their iterations ran in shared batches (fewer executions than iterations)."""
    n, clients = 40, 6
    before = _executions(server)
    barrier = threading.Barrier(clients)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def one() -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            barrier.wait()
            results.append(_iterate(c, grpcclient, n))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(it for it, _ in results) == [n] * clients
    assert max(peak for _, peak in results) > 1
    assert _executions(server) - before < n * clients


def test_every_way_a_request_ends_frees_its_slot(server: ServerProcess) -> None:
    """More requests than slots, one after another: answered, failed (an error response) and
    abandoned (the client's deadline passed) requests all give their slot back."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(SLOTS + 2):
            with pytest.raises(InferenceServerException, match="N must be positive"):
                _iterate(client, grpcclient, 0)
        for _ in range(SLOTS + 2):
            with pytest.raises(InferenceServerException, match="Deadline"):
                _iterate(client, grpcclient, 100_000, client_timeout=0.05)
        for _ in range(SLOTS + 2):
            assert _iterate(client, grpcclient, 2) == (2, 1)
    finally:
        client.close()


def test_decoupled_model_streams_one_response_per_iteration(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for request_id, count in (("a", 4), ("b", 3)):
            x = grpcclient.InferInput("IN", [1], "INT32")
            x.set_data_from_numpy(np.array([count], np.int32))
            client.async_stream_infer("iterate_stream", [x], request_id=request_id)
        seen: dict[str, list[tuple[int, bool]]] = {"a": [], "b": []}
        for _ in range(7):
            result, error = got.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            final = bool(resp.parameters["triton_final_response"].bool_param)
            seen[resp.id].append((int(result.as_numpy("OUT")[0]), final))
        assert seen == {"a": [(3, False), (2, False), (1, False), (0, True)], "b": [(2, False), (1, False), (0, True)]}
        with pytest.raises(queue.Empty):
            got.get(timeout=0.3)
    finally:
        client.stop_stream()
        client.close()


def test_rescheduling_without_iterative_sequences_fails_as_in_triton(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.url)
    try:
        x = httpclient.InferInput("IN", [1], "INT32")
        x.set_data_from_numpy(np.array([1], np.int32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("reschedule_unconfigured", [x])
        assert info.value.status() == "400"
        assert (
            "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is not configured "
            "to handle such a flag." in str(info.value)
        )
    finally:
        client.close()
