"""Generate the ONNX example models of the example model repository.

The models are built with the ``onnx`` helper API, so no model binary is committed::

    python scripts/make_examples.py [REPO] [--force]

writes ``<REPO>/<name>/1/model.onnx`` (when missing or different, or always with ``--force``)
and ``<REPO>/<name>/config.pbtxt`` (only when missing) for every example. ``REPO`` defaults to
``examples/models``. This module needs only ``onnx`` and ``numpy``, not the rest of Shoal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
"""ONNX opset of the generated models (well supported by onnxruntime >= 1.14)."""
IR_VERSION = 8
"""The IR version that goes with opset 17; older onnxruntime releases refuse newer IRs."""
MLP_SEED = 20240517
"""Seed of the MLP weights, so every run generates the same bytes."""


def onnx_model(graph: onnx.GraphProto, producer: str = "shoal-make-examples") -> onnx.ModelProto:
    """``graph`` as a checked model of ``OPSET`` / ``IR_VERSION`` (also used by
    scripts/make_triton_examples.py)."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=producer,
    )
    onnx.checker.check_model(model)
    return model


def simple_model() -> onnx.ModelProto:
    """Triton's "simple": OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32 [16])."""

    def io(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 16])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
        ],
        "simple_onnx",
        [io("INPUT0"), io("INPUT1")],
        [io("OUTPUT0"), io("OUTPUT1")],
    )
    return onnx_model(graph)


def identity_model() -> onnx.ModelProto:
    """OUTPUT0 = INPUT0, FP32 of any length: the cheapest possible model, for overhead benchmarks."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity")],
        "identity_onnx",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "n"])],
    )
    return onnx_model(graph)


MLP_LAYERS = (256, 1024, 1024, 16)
"""Widths of the MLP: input, two hidden ReLU layers, output (about 2.6 MFLOP per sample)."""


def mlp_model() -> onnx.ModelProto:
    """A dense FP32 MLP 256 -> 1024 -> 1024 -> 16 with fixed, seeded random weights."""
    rng = np.random.default_rng(MLP_SEED)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "INPUT0"
    last = len(MLP_LAYERS) - 2
    for i, (fan_in, fan_out) in enumerate(zip(MLP_LAYERS, MLP_LAYERS[1:], strict=False)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = "OUTPUT0" if i == last else f"h{i}"
        pre = y if i == last else f"z{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [pre], name=f"bias{i}"))
        if i != last:
            nodes.append(helper.make_node("Relu", [pre], [y], name=f"relu{i}"))
        x = y
    graph = helper.make_graph(
        nodes,
        "mlp_onnx",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", MLP_LAYERS[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", MLP_LAYERS[-1]])],
        initializer=inits,
    )
    return onnx_model(graph)


SIMPLE_CONFIG = """\
name: "simple_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
instance_group [
  {
    kind: KIND_CPU
    count: 1
  }
]
"""

IDENTITY_CONFIG = """\
name: "identity_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }
]
instance_group [
  {
    kind: KIND_CPU
    count: 1
  }
]
"""

MLP_CONFIG = f"""\
name: "mlp_onnx"
backend: "onnxruntime"
max_batch_size: 64
input [
  {{
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ {MLP_LAYERS[0]} ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ {MLP_LAYERS[-1]} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 200
}}
instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]
"""


@dataclass(frozen=True, slots=True)
class Example:
    """One example model: its directory name, ONNX builder and ``config.pbtxt`` text."""

    name: str
    build: Callable[[], onnx.ModelProto]
    config: str


EXAMPLES: tuple[Example, ...] = (
    Example("simple_onnx", simple_model, SIMPLE_CONFIG),
    Example("identity_onnx", identity_model, IDENTITY_CONFIG),
    Example("mlp_onnx", mlp_model, MLP_CONFIG),
)


def write_if_changed(path: Path, data: bytes, force: bool) -> bool:
    if not force and path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def make_examples(repo: Path, force: bool = False) -> list[Path]:
    """Write every example into the model repository ``repo``; returns the files written.

    ``model.onnx`` is rewritten when its bytes differ from the generated model (always with
    ``force``); ``config.pbtxt`` is written only when missing, so local edits survive.
    """
    written: list[Path] = []
    for ex in EXAMPLES:
        model_dir = Path(repo) / ex.name
        model_path = model_dir / "1" / "model.onnx"
        if write_if_changed(model_path, ex.build().SerializeToString(), force):
            written.append(model_path)
        config_path = model_dir / "config.pbtxt"
        if not config_path.exists():
            config_path.write_text(ex.config, encoding="utf-8")
            written.append(config_path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "repo", nargs="?", type=Path, default=Path("examples/models"), help="model repository directory"
    )
    parser.add_argument("--force", action="store_true", help="rewrite model.onnx files even when unchanged")
    args = parser.parse_args(argv)
    for path in make_examples(args.repo, force=args.force):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
