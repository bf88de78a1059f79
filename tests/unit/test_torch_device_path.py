"""The PyTorch backend's GPU data path (``workers/backends/torchgpu.py``) run on the CPU
(``pin=False``, no stream): batches gathered into one staging buffer and one device buffer,
outputs staged once per batch, results equal to the plain CPU path, buffers reused.
The same code on a GPU is tested by tests/gpu/test_pytorch_gpu.py."""

# no "from __future__ import annotations": TorchScript reads the forward annotations
import gc
import warnings
from typing import Any, Tuple  # noqa: UP035 - TorchScript's spelling

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.proto.errors import InvalidInput  # noqa: E402
from shoal.proto.gen import model_config_pb2 as mc  # noqa: E402
from shoal.workers.backends.base import Device, ModelSpec, WorkRequest  # noqa: E402
from shoal.workers.backends.pytorch import PyTorchBackend  # noqa: E402
from shoal.workers.backends.torchgpu import ALIGN, TorchDevicePath  # noqa: E402


class TwoInTwoOut(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
        return a * 2 + b.to(torch.float32).sum(dim=1, keepdim=True), a


def _backend(max_batch: int, cfg: mc.ModelConfig | None = None) -> Any:
    cfg = cfg or mc.ModelConfig(name="m", backend="pytorch", max_batch_size=max_batch)
    cfg.input.add(name="a", data_type=mc.TYPE_FP32, dims=[3])
    cfg.input.add(name="b", data_type=mc.TYPE_INT64, dims=[2])
    cfg.output.add(name="OUT__0", data_type=mc.TYPE_FP32, dims=[3])
    cfg.output.add(name="OUT__1", data_type=mc.TYPE_FP32, dims=[3])
    spec = ModelSpec("m", 1, cfg, "/nonexistent", "/nonexistent/m", "/nonexistent/m/1", "m_0", Device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(TwoInTwoOut())
    return PyTorchBackend(spec, torch, module, torch.device("cpu"))


def _request(i: int, rows: int, rng: np.random.Generator, outputs: list[str] | None = None) -> WorkRequest:
    a = rng.standard_normal((rows, 3)).astype(np.float32)
    b = rng.integers(-9, 9, (rows, 2)).astype(np.int64)
    a.setflags(write=False)  # as shared-memory views arrive
    return WorkRequest(id=i, inputs={"a": a, "b": b}, requested_outputs=outputs or [])


def _expected(req: WorkRequest) -> tuple[np.ndarray, np.ndarray]:
    a, b = req.inputs["a"], req.inputs["b"]
    return a * 2 + b.sum(axis=1, keepdims=True).astype(np.float32), a


@pytest.mark.parametrize("max_batch", [8, 0])
def test_staged_batches_equal_the_plain_path(max_batch: int) -> None:
    staged, plain = _backend(max_batch), _backend(max_batch)
    staged._path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    rng = np.random.default_rng(5)
    for sizes in ([1], [2, 1, 3], [1, 1, 1, 1, 1, 1, 1, 1], [4]):
        requests = [_request(i, n, rng) for i, n in enumerate(sizes)]
        got, want = staged.execute(requests), plain.execute(requests)
        for g, w in zip(got, want, strict=True):
            assert g.error is None and w.error is None
            assert sorted(g.outputs) == ["OUT__0", "OUT__1"]
            for name in g.outputs:
                np.testing.assert_allclose(g.outputs[name], w.outputs[name], rtol=1e-6)
        for g, r in zip(got, requests, strict=True):
            exp0, exp1 = _expected(r)
            np.testing.assert_allclose(g.outputs["OUT__0"], exp0, rtol=1e-6)
            np.testing.assert_array_equal(g.outputs["OUT__1"], exp1)


def test_requested_outputs_and_buffers_reused() -> None:
    backend = _backend(8)
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    backend._path = path
    rng = np.random.default_rng(6)
    for _ in range(50):
        requests = [_request(0, 3, rng, ["OUT__1"]), _request(1, 2, rng, ["OUT__1"])]
        responses = backend.execute(requests)
        assert [sorted(r.outputs) for r in responses] == [["OUT__1"], ["OUT__1"]]
        np.testing.assert_array_equal(responses[1].outputs["OUT__1"], requests[1].inputs["a"])
    # one allocation each: the buffers grew once and are reused by every later batch
    assert (path.host_in.allocations, path.device_in.allocations, path.host_out.allocations) == (1, 1, 1)


def test_gather_layout_is_aligned_and_contiguous() -> None:
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    assert path.gather({}) == {}  # nothing to stage (on a GPU: every input in CUDA shared memory)
    x = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3, dtype=np.float32).reshape(1, 3) + 100]
    y = [np.ones((2, 1), np.bool_), np.zeros((1, 1), np.bool_)]
    out = path.gather({"x": x, "y": y})
    np.testing.assert_array_equal(out["x"].numpy(), np.concatenate(x))
    np.testing.assert_array_equal(out["y"].numpy(), np.concatenate(y))
    base = path.device_in.data.data_ptr()
    assert out["x"].data_ptr() == base and (out["y"].data_ptr() - base) % ALIGN == 0
    # the views handed out by ``fetch`` survive the next run of the same batch (not batching)
    first = path.fetch({"o": out["x"] * 1}, frozenset())
    second = path.fetch({"o": out["x"] * 3}, frozenset())
    np.testing.assert_array_equal(first["o"] * 3, second["o"])


def test_batch_of_different_shapes_or_bytes_is_refused() -> None:
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    with pytest.raises(InvalidInput, match="differ"):
        path.gather({"x": [np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32)]})
    with pytest.raises(InvalidInput, match="BYTES"):
        path.gather({"s": [np.array([[b"a"]], dtype=np.object_)]})


@pytest.mark.parametrize("parallel_bytes", [0, 1 << 40])
def test_large_batches_staged_in_chunks_on_threads(parallel_bytes: int) -> None:
    """Inputs over ``CHUNK_BYTES`` are staged in pieces, on threads from ``parallel_bytes``."""
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    path.parallel_bytes = parallel_bytes
    rng = np.random.default_rng(7)
    x = [rng.standard_normal((k, 3, 100, 100)).astype(np.float32) for k in (1, 4, 2, 3)]  # 120 KB per row
    y = [rng.integers(0, 9, (k, 700_000)).astype(np.uint8) for k in (1, 4, 2, 3)]  # rows over a chunk
    for _ in range(2):
        out = path.gather({"x": x, "y": y})
        np.testing.assert_array_equal(out["x"].numpy(), np.concatenate(x))
        np.testing.assert_array_equal(out["y"].numpy(), np.concatenate(y))
        x = x[::-1]


def _place(backend: Any, arr: np.ndarray) -> np.ndarray:
    """What the worker does with an input in client system shared memory: read it into the
    memory the backend's ``host_input`` hands out."""
    buf = backend.host_input(arr.nbytes)
    view = np.frombuffer(buf, dtype=arr.dtype).reshape(arr.shape)
    view[...] = arr
    return view


@pytest.mark.parametrize("placed", [("a",), ("a", "b")])
def test_inputs_read_into_staging_go_up_without_a_second_copy(placed: tuple[str, ...]) -> None:
    staged, plain = _backend(8), _backend(8)
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    staged._path, staged.host_input = path, path.host_input
    rng = np.random.default_rng(8)
    for sizes in ([2, 1, 3], [1], [4, 4]):
        requests = [_request(i, n, rng) for i, n in enumerate(sizes)]
        staged.begin_batch()
        mine = [
            WorkRequest(
                id=r.id,
                inputs={k: _place(staged, v) if k in placed else v for k, v in r.inputs.items()},
                requested_outputs=[],
            )
            for r in requests
        ]
        used = path.host_in.used
        got, want = staged.execute(mine), plain.execute(requests)
        if placed == ("a", "b"):  # nothing left to stage: no staging memory taken by the gather
            assert path.host_in.used == used
        for g, w in zip(got, want, strict=True):
            for name in w.outputs:
                np.testing.assert_allclose(g.outputs[name], w.outputs[name], rtol=1e-6)
    # a batch whose inputs did not come through host_input (warmup) is staged as before
    requests = [_request(0, 2, rng), _request(1, 1, rng)]
    for g, w in zip(staged.execute(requests), plain.execute(requests), strict=True):
        np.testing.assert_allclose(g.outputs["OUT__0"], w.outputs["OUT__0"], rtol=1e-6)


def test_small_inputs_read_into_staging_go_up_in_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs of consecutive requests read through ``host_input`` lie end to end in the
    pinned staging (``INPUT_ALIGN``), as they do in the device buffer: one copy up for the
    batch's input, not one a request (16-byte rows, which 256-byte alignment kept apart)."""
    from shoal.workers.backends import torchgpu

    staged, plain = _backend(8), _backend(8)
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    staged._path, staged.host_input = path, path.host_input
    runs: list[int] = []
    joined = torchgpu._runs

    def counted(copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        out = joined(copies)
        runs.append(len(out))
        return out

    monkeypatch.setattr(torchgpu, "_runs", counted)
    rng = np.random.default_rng(10)
    requests = [_request(i, 1, rng) for i in range(6)]
    staged.begin_batch()
    mine = [WorkRequest(id=r.id, inputs={"a": r.inputs["a"], "b": _place(staged, r.inputs["b"])}, requested_outputs=[])
            for r in requests]  # fmt: skip
    got, want = staged.execute(mine), plain.execute(requests)
    assert runs == [1]
    for g, w in zip(got, want, strict=True):
        for name in w.outputs:
            np.testing.assert_allclose(g.outputs[name], w.outputs[name], rtol=1e-6)


def test_a_batch_launched_before_the_last_is_finished_keeps_both_apart() -> None:
    """``launch`` (the worker's pipeline): batch B is read and launched before batch A is
    waited for, so each has its own pinned buffers; A's outputs are intact after B's."""
    staged, plain = _backend(8), _backend(8)
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    staged._path, staged.host_input, staged.pipelined = path, path.host_input, True
    rng = np.random.default_rng(9)
    batches = [[_request(i, n, rng) for i, n in enumerate(sizes)] for sizes in ([2, 1], [3], [1, 1, 2], [4, 4])]
    checked = 0

    def check(got: list[Any]) -> None:  # as the worker writes a batch's answers: before the next but one begins
        nonlocal checked
        for g, w in zip(got, plain.execute(batches[checked]), strict=True):
            for name in w.outputs:
                np.testing.assert_allclose(g.outputs[name], w.outputs[name], rtol=1e-6)
        checked += 1

    pending = None
    for requests in batches:
        staged.begin_batch()
        placed = [WorkRequest(id=r.id, inputs={k: _place(staged, v) for k, v in r.inputs.items()},
                              requested_outputs=[]) for r in requests]  # fmt: skip
        launched = staged.launch(placed)
        if pending is not None:
            check(pending.finish())
        pending = launched
    assert pending is not None
    check(pending.finish())
    assert checked == len(batches)
    # two sets of pinned buffers, each grown once
    assert [b.allocations for b in (*path._host_in, *path._host_out)] == [1, 1, 1, 1]


def test_a_failed_launch_raises_at_once() -> None:
    backend = _backend(8)
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    backend._path, backend.pipelined = path, True
    bad = WorkRequest(id=0, inputs={"a": np.zeros((1, 3), np.float32)}, requested_outputs=[])
    with pytest.raises(InvalidInput, match="needs input 'b'"):
        backend.launch([bad])
    rng = np.random.default_rng(10)
    ok = [_request(0, 2, rng)]
    np.testing.assert_allclose(backend.launch(ok).finish()[0].outputs["OUT__0"], _expected(ok[0])[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("groups", "value", "on_gpu", "expected"),
    [
        ([1], "", True, True),
        ([2], "", True, True),
        ([1, 1], "auto", True, True),
        ([1], "auto", False, False),
        ([2], "true", True, True),
        ([1], "true", False, True),
        ([1], "FALSE", True, False),
    ],
)
def test_pipelining_follows_the_parameter_and_the_device(
    groups: list[int], value: str, on_gpu: bool, expected: bool
) -> None:
    from shoal.workers.backends.pipeline import pipelined as _pipelined

    cfg = mc.ModelConfig(name="m", backend="pytorch", max_batch_size=8)
    for count in groups:
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=count)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=4)
    if value:
        cfg.parameters["SHOAL_PIPELINE_BATCHES"].string_value = value
    spec = ModelSpec("m", 1, cfg, "/nonexistent", "/nonexistent/m", "/nonexistent/m/1", "m_0", Device("GPU", 0))
    assert _pipelined(spec, on_gpu) is expected


def test_a_bad_pipelining_parameter_fails_the_load_by_name() -> None:
    cfg = mc.ModelConfig(name="m", backend="pytorch", max_batch_size=8)
    cfg.parameters["SHOAL_PIPELINE_BATCHES"].string_value = "sometimes"
    with pytest.raises(InvalidInput, match="SHOAL_PIPELINE_BATCHES must be auto, true or false, got 'sometimes'"):
        _backend(8, cfg)


def test_staging_handed_out_before_the_buffer_grows_stays_valid() -> None:
    """``host_input`` hands out numpy slices of the pinned buffer; one handed out before the
    buffer grows (a larger input later in the batch) keeps the old storage alive and its
    bytes reach the device."""
    path = TorchDevicePath(torch, torch.device("cpu"), pin=False)
    path.begin_inputs()
    small = np.frombuffer(path.host_input(64), dtype=np.float32)
    small[:] = 1.5
    big = np.frombuffer(path.host_input(3 << 20), dtype=np.float32)  # more than the first 1 MiB
    big[:] = 2.5
    assert path.host_in.allocations == 2
    gc.collect()
    assert (small == 1.5).all()
    got = path.gather({"x": [small.reshape(1, 16)], "y": [big.reshape(1, -1)]})
    assert (got["x"].numpy() == 1.5).all() and (got["y"].numpy() == 2.5).all()
