"""CUDA graphs for a PyTorch GPU instance (``optimization { cuda { graphs: true } }``).

DESIGN (issue 18): at small batches a TorchScript module's forward call is bound by the CPU:
resnet18 took about 1.5 ms of the worker's 2.1 ms at batch 1 on the H200, and 40% of the
one-instance worker's time at c=64, while the GPU waited. A captured CUDA graph replays the
same kernels with one launch. Triton reads ``optimization.cuda.graphs`` and ``graph_spec``
in its TensorRT backend only; Shoal's PyTorch backend reads them too, with the same meaning:

- ``graph_spec { batch_size: B  input { key: "x" value { dim: [...] } }
  graph_lower_bound { batch_size: L } }``: one graph for batch size B (and those input shapes,
  without the batch dimension); a batch of size L..B runs in it, padded up to B (without a
  lower bound, only batches of exactly B).
- ``graphs: true`` without ``graph_spec``: graphs for batch sizes 1, 2, 4, ... up to
  ``max_batch_size`` (and ``max_batch_size`` itself), each taking the batches down to the
  size before it, for inputs of fixed configured shape. A model that does not batch gets
  one graph of its configured shape.

A batch no graph fits runs as before. Padding rows hold whatever the last batch left there:
graphs suit models whose rows do not affect each other (the usual vision or embedding
model; not one that mixes rows, e.g. batch norm in training mode). A module that cannot
be captured (it synchronizes with the host, or its shapes depend on its data) is logged and
served without graphs. The graphs of an instance share one memory pool; every read of a
graph's outputs is queued on the instance's stream before its next replay, which is what
makes sharing safe. Static inputs are filled by a device-to-device copy from the batch's
gathered device buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.proto.gen import model_config_pb2 as mc

log = logging.getLogger("shoal.worker")

WARMUP_RUNS = 3
"""Runs before each capture (TorchScript's profiling executor settles, cuDNN picks its kernels)."""


@dataclass(frozen=True, slots=True)
class GraphShape:
    """One graph to capture: ``batch`` rows (0: the model does not batch) of ``inputs``
    (shapes without the batch dimension), used for batches of ``lower``..``batch`` rows."""

    batch: int
    lower: int
    inputs: tuple[tuple[str, tuple[int, ...]], ...]


def plan(config: mc.ModelConfig, input_names: Sequence[str]) -> list[GraphShape]:
    """The graphs ``config`` asks for (empty: none, or shapes unknown)."""
    cuda = config.optimization.cuda
    if not cuda.graphs:
        return []
    fixed = {
        i.name: tuple(int(d) for d in (i.reshape.shape if i.HasField("reshape") else i.dims)) for i in config.input
    }
    batching = config.max_batch_size > 0
    shapes: list[GraphShape] = []
    if cuda.graph_spec:
        for spec in cuda.graph_spec:
            inputs = dict(fixed)
            for name, shape in spec.input.items():
                inputs[name] = tuple(int(d) for d in shape.dim)
            batch = spec.batch_size if batching else 0
            lower = spec.graph_lower_bound.batch_size if spec.HasField("graph_lower_bound") else batch
            shapes.append(_shape(batch, min(lower, batch) or batch, inputs, input_names))
    else:
        sizes = [0]
        if batching:
            sizes, b = [], 1
            while b < config.max_batch_size:
                sizes.append(b)
                b *= 2
            sizes.append(config.max_batch_size)
        below = 0
        for b in sizes:
            shapes.append(_shape(b, below + 1 if b else 0, fixed, input_names))
            below = b
    return [s for s in shapes if s.inputs and all(d >= 0 for _, dims in s.inputs for d in dims)]


def _shape(batch: int, lower: int, inputs: Mapping[str, tuple[int, ...]], names: Sequence[str]) -> GraphShape:
    if any(n not in inputs for n in names):
        return GraphShape(batch, lower, ())
    return GraphShape(batch, lower, tuple((n, inputs[n]) for n in names))


@dataclass(slots=True)
class _Graph:
    shape: GraphShape
    graph: Any
    inputs: list[Any]
    """The static input tensors, in ``forward``'s order."""
    outputs: Any
    """What the captured forward returned (its tensors are the static outputs)."""


class TorchGraphs:
    """The captured graphs of one instance and the choice of one for a batch."""

    def __init__(self, torch: Any, stream: Any) -> None:
        self._torch = torch
        self._stream = stream
        self._graphs: list[_Graph] = []

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(
        self,
        shapes: Sequence[GraphShape],
        dtypes: Mapping[str, Any],
        device: Any,
        forward: Callable[[list[Any]], Any],
        where: str,
    ) -> None:
        """Capture a graph for each of ``shapes`` (largest first, so that the smaller ones
        reuse its memory); ``forward`` runs the module as serving does. On failure no graph
        is kept and the instance serves without them."""
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        try:
            for shape in sorted(shapes, key=lambda s: -s.batch):
                lead = (shape.batch,) if shape.batch else ()
                inputs = [torch.zeros(lead + dims, dtype=dtypes[name], device=device) for name, dims in shape.inputs]
                with torch.cuda.stream(self._stream):
                    for _ in range(WARMUP_RUNS):
                        forward(inputs)
                self._stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self._stream):
                    outputs = forward(inputs)
                self._graphs.append(_Graph(shape, graph, inputs, outputs))
        except Exception as exc:  # noqa: BLE001 - capture is an optimization: serve without it
            log.warning("%s: CUDA graphs not used, capturing failed: %s", where, exc)
            self._graphs.clear()
            self._stream.synchronize()
            return
        self._graphs.sort(key=lambda g: g.shape.batch)
        log.info("%s: captured CUDA graphs for batch sizes %s", where, [g.shape.batch for g in self._graphs])

    def find(self, rows: int, tensors: Sequence[Any], batching: bool) -> _Graph | None:
        """The smallest graph taking a batch of ``rows`` with these input tensors."""
        for g in self._graphs:
            if batching and not g.shape.lower <= rows <= g.shape.batch:
                continue
            start = 1 if batching else 0
            if all(tuple(t.shape[start:]) == dims and t.dtype == s.dtype
                   for t, (_, dims), s in zip(tensors, g.shape.inputs, g.inputs, strict=True)):  # fmt: skip
                return g
        return None

    def replay(self, g: _Graph, tensors: Sequence[Any], rows: int) -> Any:
        """Run ``g`` on ``tensors`` (copied into its static inputs; call on the instance's
        stream); returns its outputs, sliced to ``rows`` for a batching model."""
        for static, t in zip(g.inputs, tensors, strict=True):
            (static[:rows] if g.shape.batch else static).copy_(t, non_blocking=True)
        g.graph.replay()
        if not g.shape.batch:
            return g.outputs
        return _rows(g.outputs, rows)


def _rows(value: Any, rows: int) -> Any:
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_rows(v, rows) for v in value)
    return value[:rows]
