"""CUDA graphs for an ONNX Runtime GPU instance (``optimization { cuda { graphs: true } }``).

DESIGN (issue 18): at batch 1 a resnet18 export spent 1.3-1.9 ms in ``run_with_iobinding`` on
the H200 (0.8-1.0 ms for the same session in a loop), most of it the CPU launching kernels one
by one; c=1 missed its target (served p50 within 0.5 ms of the loop) by a millisecond. Triton's
onnxruntime backend has no CUDA-graph option (it reads ``optimization.cuda.graphs`` in its
TensorRT backend only); Shoal reads the same fields here as its PyTorch backend does
(``torchgraphs.plan``: ``graph_spec``, or batch sizes 1, 2, 4, ... up to ``max_batch_size``
for inputs of fixed configured shape) and uses onnxruntime's own capture: the CUDA provider's
``enable_cuda_graph`` and, per graph, the run option ``gpu_graph_id`` (1, 2, ...; -1 runs a
batch no graph fits without one), which onnxruntime has since 1.18 (an older one is served
without graphs: it would replay its one graph for every batch size).

onnxruntime replays a graph on the addresses it was captured with, so each graph has its own
static input and output buffers, bound once (``io_binding``); a batch is copied into the
static inputs (host or device, on a stream of this instance, waited for), the graph replayed,
and the batch's rows of each output copied out (to the host, or to a new device buffer for an
output kept on the device), so the next replay cannot overwrite what a client still reads.
Padding rows hold what the last batch left there (as ``torchgraphs`` says: for models whose
rows do not mix). onnxruntime keeps a captured graph per calling thread and captures after two
ordinary runs of that graph id on it, in CUDA's global capture mode, where another thread's
CUDA call breaks the capture: an instance with graphs therefore runs every batch on its main
thread (no ``SHOAL_PIPELINE_BATCHES`` thread). A session that onnxruntime cannot capture
(nodes outside the CUDA provider) is served without graphs, with a warning.

Measured (H200, resnet18 export, onnxruntime-gpu 1.31.1, one instance, A/B/A in one call): a
batch of one took 0.73-0.78 ms of compute with graphs against 1.21 ms without; CUDA shared
memory c=64 5.6-6.4k infer/s against 4.1k.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.workers.backends.torchgraphs import GraphShape
from shoal.workers.devview import DeviceView, address
from shoal.workers.tensors import is_device_array

log = logging.getLogger("shoal.worker")

WARMUP_RUNS = 3
"""Runs of each graph id at capture: onnxruntime (1.31) captures on the third run of an id on a
thread (two ordinary runs first, for its memory arena) and replays it in the same run."""
DEVICE = 0


@dataclass(slots=True)
class _Graph:
    shape: GraphShape
    options: Any
    """onnxruntime ``RunOptions`` carrying ``gpu_graph_id``."""
    io: Any
    inputs: dict[str, Any]
    """Static input buffers (CuPy arrays), by input name."""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Static output buffers (CuPy arrays), by output name."""


class OrtGraphs:
    """The graphs of one session and the choice of one for a batch."""

    def __init__(self, ort: Any, session: Any, batching: bool, plain_options: Any) -> None:
        import cupy

        self._ort = ort
        self._cupy = cupy
        self._session = session
        self.batching = batching
        self._graphs: list[_Graph] = []
        self.plain_options = plain_options
        """Run options of a run outside the graphs (``gpu_graph_id`` -1)."""
        with cupy.cuda.Device(DEVICE):
            self._stream = cupy.cuda.Stream(non_blocking=True)

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(
        self, shapes: Sequence[GraphShape], in_dtypes: Mapping[str, Any], out_dtype: Callable[[str], Any], where: str
    ) -> None:
        """A graph for each of ``shapes``: static buffers bound, the output shapes learnt from
        an ordinary run, then the runs that capture. On failure no graph is kept."""
        cupy = self._cupy
        session = self._session
        outputs = [o.name for o in session.get_outputs()]
        try:
            with cupy.cuda.Device(DEVICE):
                for gid, shape in enumerate(sorted(shapes, key=lambda s: s.batch), start=1):
                    lead = (shape.batch,) if shape.batch else ()
                    options = self._ort.RunOptions()
                    options.add_run_config_entry("gpu_graph_id", str(gid))
                    io = session.io_binding()
                    g = _Graph(shape, options, io, {})
                    for name, dims in shape.inputs:
                        buf = cupy.zeros(lead + dims, dtype=in_dtypes[name])
                        g.inputs[name] = buf
                        io.bind_input(name, "cuda", DEVICE, buf.dtype, buf.shape, buf.data.ptr)
                    for name in outputs:
                        io.bind_output(name, "cuda", DEVICE)
                    session.run_with_iobinding(io, self.plain_options)  # the outputs' shapes
                    learnt = [tuple(v.shape()) for v in io.get_outputs()]
                    io.clear_binding_outputs()
                    for name, shape_out in zip(outputs, learnt, strict=True):
                        buf = cupy.empty(shape_out, dtype=out_dtype(name))
                        g.outputs[name] = buf
                        io.bind_output(name, "cuda", DEVICE, buf.dtype, buf.shape, buf.data.ptr)
                    for _ in range(WARMUP_RUNS):
                        session.run_with_iobinding(io, options)
                    self._graphs.append(g)
        except Exception as exc:  # noqa: BLE001 - graphs are an optimization: serve without them
            log.warning("%s: onnxruntime CUDA graphs not used, capturing failed: %s", where, exc)
            self._graphs.clear()
            return
        log.info(
            "%s: captured onnxruntime CUDA graphs for batch sizes %s", where, [g.shape.batch for g in self._graphs]
        )

    def find(self, feed: Mapping[str, Any], output_names: Sequence[str]) -> _Graph | None:
        """The smallest graph taking this batch (its inputs' shapes and types, its outputs)."""
        if not feed:
            return None
        rows = next(iter(feed.values())).shape[0] if self.batching else 0
        for g in self._graphs:
            if self.batching and not g.shape.lower <= rows <= g.shape.batch:
                continue
            if len(feed) != len(g.inputs) or any(n not in g.outputs for n in output_names):
                continue
            start = 1 if self.batching else 0
            if all(
                (s := g.inputs.get(n)) is not None and tuple(a.shape[start:]) == s.shape[start:] and a.dtype == s.dtype
                for n, a in feed.items()
            ):
                return g
        return None

    def run(
        self, g: _Graph, feed: Mapping[str, Any], output_names: Sequence[str], keep: frozenset[str]
    ) -> dict[str, Any]:
        """``g`` replayed on ``feed``: the batch's rows of each output, on the host, or in a
        device buffer of their own for the outputs in ``keep``."""
        cupy = self._cupy
        runtime = cupy.cuda.runtime
        stream = self._stream
        rows = next(iter(feed.values())).shape[0] if self.batching else 0
        d2d, d2h = runtime.memcpyDeviceToDevice, runtime.memcpyDeviceToHost
        with cupy.cuda.Device(DEVICE):
            held = []  # host arrays alive until the copies are done
            for name, array in feed.items():
                dst = g.inputs[name].data.ptr
                if is_device_array(array):
                    if not array.flags.c_contiguous:
                        array = cupy.ascontiguousarray(array)
                    kind = d2d
                    src = address(array)
                else:
                    array = np.ascontiguousarray(array)
                    held.append(array)
                    kind = runtime.memcpyHostToDevice
                    src = array.ctypes.data
                runtime.memcpyAsync(dst, src, array.nbytes, kind, stream.ptr)
            stream.synchronize()
            self._session.run_with_iobinding(g.io, g.options)
            out: dict[str, Any] = {}
            for name in output_names:
                static = g.outputs[name]
                part = static[:rows] if self.batching else static
                if name in keep:
                    copy = cupy.empty(part.shape, dtype=part.dtype)
                    runtime.memcpyAsync(copy.data.ptr, part.data.ptr, part.nbytes, d2d, stream.ptr)
                    out[name] = DeviceView(copy.data.ptr, tuple(copy.shape), copy.dtype, DEVICE, copy)
                else:
                    host = np.empty(part.shape, dtype=part.dtype)
                    runtime.memcpyAsync(host.ctypes.data, part.data.ptr, part.nbytes, d2h, stream.ptr)
                    out[name] = host
            stream.synchronize()
        return out
