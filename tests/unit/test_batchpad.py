"""Batch padding to a few sizes (``workers.backends.batchpad``) and its use by the ONNX Runtime
backend (``SHOAL_ORT_BATCH_BUCKETS``), with real onnxruntime sessions on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends.base import WorkRequest, merged_inputs
from shoal.workers.backends.batchpad import BatchBuckets, parse_buckets

ort = pytest.importorskip("onnxruntime")

from shoal.workers.backends.onnxruntime import OnnxRuntimeBackend, _buckets  # noqa: E402
from tests.unit.test_onnx_backend import _spec, make_examples  # noqa: E402


def test_parse_buckets() -> None:
    assert parse_buckets("pow2", 128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert parse_buckets(" POW2 ", 48) == [1, 2, 4, 8, 16, 32, 48]
    assert parse_buckets("pow2", 1) == [1]
    assert parse_buckets("off", 8) is None
    assert parse_buckets("4, 16", 64) == [4, 16, 64]
    for bad in ("0,4", "4,65", "four", "", ","):
        with pytest.raises(ValueError):
            parse_buckets(bad, 64)


def test_buckets_grow_at_once_and_shrink_after_a_lull() -> None:
    b = BatchBuckets([1, 2, 4, 8, 16, 32, 64], patience=4)
    assert b.size_for(1) == 1
    assert b.size_for(3) == 4
    assert b.size_for(20) == 32
    # smaller batches keep the size in use ...
    assert [b.size_for(n) for n in (5, 17, 3)] == [32, 32, 32]
    # ... and one that needs it resets the count
    assert b.size_for(30) == 32
    assert [b.size_for(n) for n in (5, 9, 3)] == [32, 32, 32]
    # the fourth in a row that fits a smaller bucket: the largest of them
    assert b.size_for(2) == 16
    assert b.size_for(16) == 16
    assert b.size_for(64) == 64
    assert b.fit(100) == 100  # above every bucket: as it is


def test_merged_inputs_pads_with_zero_rows() -> None:
    a = np.ones((2, 3), dtype=np.float32)
    c = np.full((1, 3), 2, dtype=np.float32)
    reqs = [WorkRequest(id=i, inputs={"X": x}, requested_outputs=[]) for i, x in enumerate((a, c))]
    merged = merged_inputs(reqs, pad=5)["X"]
    assert merged.shape == (8, 3) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged[:3], np.concatenate([a, c]))
    assert not merged[3:].any()
    alone = merged_inputs(reqs[:1], pad=2)["X"]
    assert alone.shape == (4, 3)
    assert merged_inputs(reqs[:1])["X"] is a  # no padding: the request's own array


class _Recording(OnnxRuntimeBackend):
    """The backend, noting the batch sizes its session ran."""

    def run(self, inputs: Any, output_names: Any) -> dict[str, Any]:
        self.ran = [*getattr(self, "ran", []), int(next(iter(inputs.values())).shape[0])]
        return super().run(inputs, output_names)


def _mlp(repo: Path, buckets: str | None) -> mc.ModelConfig:
    config = text_format.Parse((repo / "mlp_onnx" / "config.pbtxt").read_text(), mc.ModelConfig())
    if buckets is not None:
        config.parameters["SHOAL_ORT_BATCH_BUCKETS"].string_value = buckets
    return config


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_examples.make_examples(root)
    return root


def test_padded_batches_give_each_request_its_own_rows(repo: Path) -> None:
    backend = _Recording.load(_spec(repo, "mlp_onnx", _mlp(repo, "pow2")))
    plain = OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx"))
    rng = np.random.default_rng(3)
    try:
        for sizes in ((2, 1, 2), (7,), (1,), (3, 3, 3, 3, 3)):
            xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in sizes]
            reqs = [WorkRequest(id=i, inputs={"INPUT0": x}, requested_outputs=[]) for i, x in enumerate(xs)]
            got = backend.execute(reqs)
            want = plain.execute(reqs)
            for x, g, w in zip(xs, got, want, strict=True):
                assert g.error is None
                assert g.outputs["OUTPUT0"].shape == (x.shape[0], 16)
                np.testing.assert_allclose(g.outputs["OUTPUT0"], w.outputs["OUTPUT0"], rtol=1e-5, atol=1e-5)
        # 5 rows -> 8; 7 -> 8; then 1 stays at 8 (no lull yet); 15 -> 16
        assert backend.ran == [8, 8, 8, 16]
    finally:
        backend.close()
        plain.close()


def test_cpu_sessions_do_not_pad_unless_asked(repo: Path) -> None:
    backend = _Recording.load(_spec(repo, "mlp_onnx"))
    try:
        x = np.zeros((5, 256), dtype=np.float32)
        backend.execute([WorkRequest(id=1, inputs={"INPUT0": x}, requested_outputs=[])])
        backend.execute([WorkRequest(id=2, inputs={"INPUT0": x[:3]}, requested_outputs=[])])
        assert backend.ran == [5, 3]
    finally:
        backend.close()


@pytest.mark.parametrize("value", ["7,x", "0", "65", "sometimes"])
def test_a_bad_bucket_parameter_fails_the_load(repo: Path, value: str) -> None:
    with pytest.raises(ServingError, match="SHOAL_ORT_BATCH_BUCKETS") as info:
        OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx", _mlp(repo, value)))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_the_gpu_default_pads_only_behind_a_dynamic_batcher(repo: Path) -> None:
    """A dynamic batcher joins requests, so their rows are independent; without one a batch is
    what one client sent, and a model may compute across its rows: no padding unless asked."""
    config = _mlp(repo, None)
    assert config.HasField("dynamic_batching")
    assert _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True) is not None
    assert _buckets(_spec(repo, "mlp_onnx", config), on_gpu=False) is None
    config.ClearField("dynamic_batching")
    assert _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True) is None
    config.parameters["SHOAL_ORT_BATCH_BUCKETS"].string_value = "8,32"
    buckets = _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True)
    assert buckets is not None and buckets.sizes == [8, 32, 64]
    config.sequence_batching.SetInParent()  # never for sequence models, even when asked
    assert _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True) is None


def test_preferred_batch_sizes_join_the_default_buckets(repo: Path) -> None:
    """A batch the dynamic batcher formed at a preferred size runs unpadded: by default the
    preferred sizes join the powers of two (sizes past max_batch_size are left out); an
    explicit ``SHOAL_ORT_BATCH_BUCKETS`` is taken as it is."""
    config = _mlp(repo, None)
    config.dynamic_batching.preferred_batch_size.extend([6, 24, 500])
    buckets = _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True)
    assert buckets is not None and buckets.sizes == [1, 2, 4, 6, 8, 16, 24, 32, 64]
    assert [buckets.fit(n) for n in (5, 6, 7, 20, 24, 25)] == [6, 6, 8, 24, 24, 32]
    assert _buckets(_spec(repo, "mlp_onnx", config), on_gpu=False) is None
    config.parameters["SHOAL_ORT_BATCH_BUCKETS"].string_value = "8"
    buckets = _buckets(_spec(repo, "mlp_onnx", config), on_gpu=True)
    assert buckets is not None and buckets.sizes == [8, 64]


def test_the_server_wide_backend_config_sets_it_too(repo: Path) -> None:
    """``--backend-config=onnxruntime,SHOAL_ORT_BATCH_BUCKETS=...`` for every model; a model's
    own parameter wins."""
    spec = _spec(repo, "mlp_onnx", _mlp(repo, None))
    spec.backend_config["SHOAL_ORT_BATCH_BUCKETS"] = "16"
    buckets = _buckets(spec, on_gpu=False)
    assert buckets is not None and buckets.sizes == [16, 64]
    spec = _spec(repo, "mlp_onnx", _mlp(repo, "off"))
    spec.backend_config["SHOAL_ORT_BATCH_BUCKETS"] = "16"
    assert _buckets(spec, on_gpu=True) is None


def test_pipelined_launches_run_in_order_on_the_backend_thread(repo: Path) -> None:
    """``SHOAL_PIPELINE_BATCHES: true``: ``launch`` returns the batch not begun; ``start``
    hands it to the backend's thread (in order), ``finish`` runs one nothing started on the
    caller's thread; batches finish with what ``execute`` gives, padded ones too; an error in
    a run is raised by its ``finish``; off by default on the CPU, even
    where it would pad (``auto`` is on for GPU sessions with IO binding only)."""
    import threading

    config = _mlp(repo, "pow2")
    default = OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx", config))
    assert not default.pipelined
    default.close()
    config.parameters["SHOAL_PIPELINE_BATCHES"].string_value = "true"
    threads: list[str] = []

    class Noting(OnnxRuntimeBackend):
        def run(self, inputs: Any, output_names: Any) -> dict[str, Any]:
            threads.append(threading.current_thread().name)
            return super().run(inputs, output_names)

    interval = sys.getswitchinterval()
    backend = Noting.load(_spec(repo, "mlp_onnx", config))
    plain = OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx"))
    rng = np.random.default_rng(5)
    try:
        assert backend.pipelined
        assert sys.getswitchinterval() == pytest.approx(500e-6)  # the batch thread gets the GIL back soon
        batches = []
        for sizes in ((2, 1), (3,), (1, 1, 1, 4), (5,)):
            xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in sizes]
            batches.append([WorkRequest(id=i, inputs={"INPUT0": x}, requested_outputs=[]) for i, x in enumerate(xs)])
        launched = [backend.launch(b) for b in batches]
        assert not threads and not any(one.done() for one in launched)  # none begun yet
        for one in launched[:3]:  # begun in turn on the thread; the last one runs in finish
            one.start()
            one.start()  # once only
        for reqs, one in zip(batches, launched, strict=True):
            got, want = one.finish(), plain.execute(reqs)
            for r, g, w in zip(reqs, got, want, strict=True):
                assert g.outputs["OUTPUT0"].shape == (r.inputs["INPUT0"].shape[0], 16)
                np.testing.assert_allclose(g.outputs["OUTPUT0"], w.outputs["OUTPUT0"], rtol=1e-5, atol=1e-5)
        assert all(one.done() for one in launched[:3])
        assert threads[:3] == ["batch-mlp_onnx_0"] * 3 and threads[3:] == ["MainThread"], threads
        bad = [WorkRequest(id=0, inputs={"INPUT0": np.zeros((1, 255), dtype=np.float32)}, requested_outputs=[])]
        for begin in (True, False):  # an error is raised by finish, on the thread or not
            failed = backend.launch(bad)
            if begin:
                failed.start()
            with pytest.raises(ServingError, match="onnxruntime"):
                failed.finish()
    finally:
        backend.close()
        plain.close()
        sys.setswitchinterval(interval)
    assert not any(t.name.startswith("batch-mlp_onnx") for t in threading.enumerate())


def test_the_gil_switch_interval_of_a_pipelined_worker(repo: Path) -> None:
    """``SHOAL_GIL_SWITCH_INTERVAL_US`` sets the interval a batch thread gives the worker; a
    value that is no positive integer fails the load, naming the parameter."""
    config = _mlp(repo, "pow2")
    config.parameters["SHOAL_PIPELINE_BATCHES"].string_value = "true"
    config.parameters["SHOAL_GIL_SWITCH_INTERVAL_US"].string_value = "2000"
    interval = sys.getswitchinterval()
    try:
        OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx", config)).close()
        assert sys.getswitchinterval() == pytest.approx(2000e-6)
        for bad in ("0", "-5", "fast", "1.5"):
            config.parameters["SHOAL_GIL_SWITCH_INTERVAL_US"].string_value = bad
            with pytest.raises(ServingError, match="SHOAL_GIL_SWITCH_INTERVAL_US"):
                OnnxRuntimeBackend.load(_spec(repo, "mlp_onnx", config))
    finally:
        sys.setswitchinterval(interval)
