"""The response cache through the real server: hits answer without running the model, the
statistics and metrics count hits and misses, the size bound evicts, and what changes the
answer (inputs, shapes, requested outputs, parameters) changes the key."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.server import ServerProcess

# RUN: how many times this instance executed a request before (a cached answer shows an old
# count); OUT: the input, unchanged; BIG: OUT repeated 16384 times (256 KiB at shape [4])
MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.runs = 0

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            self.runs += 1
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("RUN", np.array([self.runs], dtype=np.int64)),
                pb_utils.Tensor("OUT", x.copy()),
                pb_utils.Tensor("BIG", np.tile(x, 16384)),
            ]))
        return out
"""
CONFIG = """
backend: "python"
max_batch_size: 0
input [{{ name: "IN", data_type: TYPE_FP32, dims: [-1] }}]
output [
  {{ name: "RUN", data_type: TYPE_INT64, dims: [1] }},
  {{ name: "OUT", data_type: TYPE_FP32, dims: [-1] }},
  {{ name: "BIG", data_type: TYPE_FP32, dims: [-1] }}
]
instance_group [{{ kind: KIND_CPU, count: 1 }}]
{cache}
"""
ENABLED = "response_cache { enable: true }"
CACHE_BYTES = 600 << 10  # two answers with BIG (256 KiB each) fit, not three


def _repo(root: Path) -> Path:
    for name, cache in (("cached", ENABLED), ("plain", "")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(textwrap.dedent(MODEL))
        (root / name / "config.pbtxt").write_text(CONFIG.format(cache=cache))
    (root / "stream" / "1").mkdir(parents=True)
    (root / "stream" / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    decoupled = CONFIG.format(cache=ENABLED) + "model_transaction_policy { decoupled: true }\n"
    (root / "stream" / "config.pbtxt").write_text(decoupled)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(_repo(tmp_path_factory.mktemp("repo")), f"--cache-config=local,size={CACHE_BYTES}").start()
    yield srv
    assert srv.terminate() == 0
    assert not srv.segments()


def _infer(c: httpclient.InferenceServerClient, model: str, values: list[float], *outputs: str, **kw: object) -> dict:
    inp = httpclient.InferInput("IN", [len(values)], "FP32")
    inp.set_data_from_numpy(np.array(values, dtype=np.float32))
    outs = [httpclient.InferRequestedOutput(o) for o in outputs] or None
    res = c.infer(model, [inp], outputs=outs, **kw)  # type: ignore[arg-type]
    return {name: res.as_numpy(name) for name in ("RUN", "OUT", "BIG") if res.get_output(name) is not None}


def _stats(c: httpclient.InferenceServerClient, model: str) -> dict:
    return c.get_inference_statistics(model)["model_stats"][0]


def test_hits_answer_without_running_the_model(server: ServerProcess) -> None:
    c = server.client()
    first = _infer(c, "cached", [1.0, 2.0])
    again = _infer(c, "cached", [1.0, 2.0])
    assert again["RUN"][0] == first["RUN"][0]  # the same answer: the model did not run
    assert again["OUT"].tolist() == [1.0, 2.0] and again["BIG"].shape == (2 * 16384,)
    other = _infer(c, "cached", [3.0, 4.0])
    assert other["RUN"][0] == first["RUN"][0] + 1
    s = _stats(c, "cached")
    inf = s["inference_stats"]
    assert (inf["cache_hit"]["count"], inf["cache_miss"]["count"], inf["success"]["count"]) == (1, 2, 3)
    assert s["inference_count"] == 2 and s["execution_count"] == 2
    assert inf["cache_hit"]["ns"] > 0 and inf["cache_miss"]["ns"] > 0
    # a model without response_cache runs every time
    p1, p2 = _infer(c, "plain", [1.0]), _infer(c, "plain", [1.0])
    assert p2["RUN"][0] == p1["RUN"][0] + 1
    assert _stats(c, "plain")["inference_stats"]["cache_hit"]["count"] == 0
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    assert 'nv_cache_num_hits_per_model{model="cached",version="1"} 1' in metrics
    assert 'nv_cache_num_misses_per_model{model="cached",version="1"} 2' in metrics
    assert 'nv_cache_num_hits_per_model{model="plain"' not in metrics
    config = c.get_model_config("cached")
    assert config["response_cache"] == {"enable": True}


def test_what_changes_the_answer_changes_the_key(server: ServerProcess) -> None:
    c = server.client()
    base = _infer(c, "cached", [5.0, 6.0, 7.0, 8.0])["RUN"][0]
    # the same bytes as another shape are another request
    inp = httpclient.InferInput("IN", [4], "FP32")
    inp.set_data_from_numpy(np.array([5.0, 6.0, 7.0, 8.0], dtype=np.float32))
    assert c.infer("cached", [inp]).as_numpy("RUN")[0] == base  # same shape: hit
    # requested outputs are part of the key: OUT alone is computed once, then cached
    only_out = _infer(c, "cached", [5.0, 6.0, 7.0, 8.0], "OUT", "RUN")
    assert set(only_out) == {"OUT", "RUN"} and only_out["RUN"][0] == base + 1
    assert _infer(c, "cached", [5.0, 6.0, 7.0, 8.0], "OUT", "RUN")["RUN"][0] == base + 1
    # request parameters too (a model may read them), but not scheduling ones
    with_param = _infer(c, "cached", [5.0, 6.0, 7.0, 8.0], parameters={"style": "x"})
    assert with_param["RUN"][0] == base + 2
    assert _infer(c, "cached", [5.0, 6.0, 7.0, 8.0], priority=0, timeout=10_000_000)["RUN"][0] == base


def test_grpc_and_concurrent_clients(server: ServerProcess) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    before = _stats(server.client(), "cached")["inference_stats"]

    def call(_: int) -> int:
        inp = grpcclient.InferInput("IN", [3], "FP32")
        inp.set_data_from_numpy(np.array([9.0, 9.5, 10.0], dtype=np.float32))
        res = g.infer("cached", [inp])
        assert res.as_numpy("OUT").tolist() == [9.0, 9.5, 10.0]
        return int(res.as_numpy("RUN")[0])

    with ThreadPoolExecutor(16) as pool:
        runs = list(pool.map(call, range(64)))
    g.close()
    after = _stats(server.client(), "cached")["inference_stats"]
    hits = after["cache_hit"]["count"] - before["cache_hit"]["count"]
    misses = after["cache_miss"]["count"] - before["cache_miss"]["count"]
    assert hits + misses == 64 and hits >= 48, (hits, misses)
    # every miss ran the model once; every answer is one of those runs
    assert len(set(runs)) == misses


def test_the_size_bound_evicts_least_recently_used(server: ServerProcess) -> None:
    c = server.client()
    a_in, b_in, c_in = [21.0] * 4, [22.0] * 4, [23.0] * 4  # 256 KiB answers (BIG)
    a = _infer(c, "cached", a_in)["RUN"][0]
    b = _infer(c, "cached", b_in)["RUN"][0]
    assert _infer(c, "cached", a_in)["RUN"][0] == a  # a is now the most recent
    _infer(c, "cached", c_in)  # a third evicts b, the least recent (after older tests' entries)
    assert _infer(c, "cached", a_in)["RUN"][0] == a
    assert _infer(c, "cached", b_in)["RUN"][0] > b


def test_shared_memory_requests_skip_the_cache(server: ServerProcess) -> None:
    import tritonclient.utils.shared_memory as shm

    c = server.client()
    before = _stats(c, "cached")["inference_stats"]
    handle = shm.create_shared_memory_region("cache_in", f"/cachetest_{server.pid}", 8)
    try:
        shm.set_shared_memory_region(handle, [np.array([1.0, 2.0], dtype=np.float32)])
        c.register_system_shared_memory("cache_in", f"/cachetest_{server.pid}", 8)
        runs = []
        for _ in range(2):
            inp = httpclient.InferInput("IN", [2], "FP32")
            inp.set_shared_memory("cache_in", 8)
            runs.append(c.infer("cached", [inp]).as_numpy("RUN")[0])
        assert runs[1] == runs[0] + 1
        c.unregister_system_shared_memory("cache_in")
    finally:
        shm.destroy_shared_memory_region(handle)
    after = _stats(c, "cached")["inference_stats"]
    assert after["cache_hit"]["count"] == before["cache_hit"]["count"]
    assert after["cache_miss"]["count"] == before["cache_miss"]["count"]


def test_decoupled_models_cannot_use_it(server: ServerProcess) -> None:
    index = {m["name"]: m for m in server.client().get_model_repository_index()}
    assert index["stream"]["state"] == "UNAVAILABLE"
    assert index["stream"]["reason"] == (
        "Response Cache does not currently support model stream with 'decoupled' transaction policy. "
        "Please disable the response cache."
    )
