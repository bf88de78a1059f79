"""``SHOAL_ORT_BATCH_BUCKETS`` through the real server: an ONNX model whose batches are padded
to powers of two answers every client with its own rows, as the same model without padding
does, under concurrent gRPC and HTTP clients sending batches of different sizes; the
statistics count the requests' own batch sizes, never the padded ones; a bad value fails the
load with a message naming the parameter. (On a GPU this padding is on by default for models
with a dynamic batcher: tests/gpu/test_ort_cuda.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(120)

PARAM = 'parameters { key: "SHOAL_ORT_BATCH_BUCKETS" value { string_value: "%s" } }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "mlp_onnx")
    src = repo / "mlp_onnx"
    for name, value in (("mlp_padded", "pow2"), ("mlp_bad", "4,x")):
        dest = repo / name
        (dest / "1").mkdir(parents=True)
        (dest / "1" / "model.onnx").write_bytes((src / "1" / "model.onnx").read_bytes())
        text = (src / "config.pbtxt").read_text().replace('name: "mlp_onnx"', f'name: "{name}"')
        # a delay, so that concurrent requests do form batches
        text = text.replace("max_queue_delay_microseconds: 200\n", "max_queue_delay_microseconds: 20000\n")
        (dest / "config.pbtxt").write_text(text + PARAM % value)
    srv = ServerProcess(repo).start(wait_ready=False)
    yield srv
    assert srv.terminate() == 0, srv.log[-3000:]
    assert not srv.segments()


def _infer(client: Any, url: str, model: str, x: np.ndarray) -> np.ndarray:
    """``x`` through ``model`` with ``client`` (tritonclient's http or grpc module)."""
    c = client.InferenceServerClient(url)
    try:
        inp = client.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return c.infer(model, [inp]).as_numpy("OUTPUT0")  # type: ignore[no-any-return]
    finally:
        c.close()


def test_padded_batches_answer_each_client_with_its_rows(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url)
    for model in ("mlp_padded", "mlp_onnx"):
        wait_until(lambda m=model: c.is_model_ready(m))
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in (1, 3, 2, 5, 1, 4, 2, 7, 3, 1, 6, 2) * 2]
    want = [_infer(httpclient, server.url, "mlp_onnx", x) for x in xs]
    go = threading.Barrier(len(xs))

    def client(i: int) -> np.ndarray:
        go.wait()  # all at once: they form batches
        if i % 2:
            return _infer(grpcclient, server.grpc_url, "mlp_padded", xs[i])
        return _infer(httpclient, server.url, "mlp_padded", xs[i])

    with ThreadPoolExecutor(len(xs)) as pool:
        got = list(pool.map(client, range(len(xs))))
    for i, x in enumerate(xs):
        assert got[i].shape == (x.shape[0], 16)
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)
    stats = c.get_inference_statistics("mlp_padded")["model_stats"][0]
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    # the requests' rows, counted once each, whatever size their batches ran at
    assert sum(size * count for size, count in sizes.items()) == sum(x.shape[0] for x in xs)
    assert int(stats["inference_count"]) == sum(x.shape[0] for x in xs)
    assert any(size > 8 for size in sizes), f"no batch formed: {sizes}"
    c.close()


def test_a_bad_bucket_value_fails_the_load(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url)
    try:
        wait_until(
            lambda: any(
                m.get("state") == "UNAVAILABLE" for m in c.get_model_repository_index() if m["name"] == "mlp_bad"
            )
        )
        assert not c.is_model_ready("mlp_bad")
        index = {m["name"]: m for m in c.get_model_repository_index()}
        reason = index["mlp_bad"].get("reason", "")
        assert "SHOAL_ORT_BATCH_BUCKETS" in reason and "4,x" in reason, index["mlp_bad"]
        with pytest.raises(InferenceServerException):
            _infer(httpclient, server.url, "mlp_bad", np.zeros((1, 256), np.float32))
    finally:
        c.close()
