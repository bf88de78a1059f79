"""Build Triton's example model repository (``docs/examples/model_repository`` of
triton-inference-server/server, plus python_backend's decoupled ``repeat_int32`` and the
``simple_string_dyna_sequence`` model Triton's client tests add) so that Triton's client
examples can run against Shoal unchanged::

    python scripts/make_triton_examples.py REPO [--force]

writes ``<REPO>/<name>/config.pbtxt`` and ``<REPO>/<name>/1/model.onnx`` (or ``model.py``)
for every model. The configurations carry the same facts as Triton's published ones (names,
datatypes, dims, batching, sequence control inputs, instance groups); the ONNX graphs are
generated with the ``onnx`` helper API (no binary is committed) and compute what Triton's
models compute:

* ``simple``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32 [16], batch 8).
* ``simple_int8``: the same on INT8 (computed in INT32, cast back: wraps like Triton's).
* ``simple_string``: the same on numbers carried as strings (STRING -> INT32 -> STRING).
* ``simple_sequence``: stateless, OUTPUT = READY * (INPUT + START).
* ``simple_dyna_sequence``: OUTPUT = READY * (INPUT + START + END * CORRID), CORRID UINT64.
* ``simple_string_dyna_sequence``: Triton builds it from ``simple_dyna_sequence`` with its
  C++ ``dyna_sequence`` backend and a TYPE_STRING CORRID; here an ONNX graph with implicit
  state computes the same thing: a running sum of INPUT since START, plus the numeric value
  of CORRID on the END request.
* ``simple_identity`` (Python): OUTPUT0 = INPUT0 (STRING, any length).
* ``repeat_int32`` (Python, decoupled): one response per element of IN (OUT = the element,
  IDX = its index), DELAY[i] ms before the i-th, execute returning after WAIT ms.

This module needs only ``onnx``, not the rest of Shoal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_examples import onnx_model, write_if_changed  # noqa: E402  (a script beside this one)

INT32 = TensorProto.INT32


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return onnx_model(graph, producer="shoal-make-triton-examples")


def _vi(name: str, elem: int, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, ["batch", width])


def _add_sub(graph_name: str, elem: int) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 on [batch, 16] tensors of ``elem``,
    computed in INT32 (inputs cast to it, results cast back, unless ``elem`` is INT32)."""
    nodes = []
    a, b = "INPUT0", "INPUT1"
    if elem != INT32:
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["a32"], to=INT32),
            helper.make_node("Cast", ["INPUT1"], ["b32"], to=INT32),
        ]
        a, b = "a32", "b32"
    sums = ("OUTPUT0", "OUTPUT1") if elem == INT32 else ("sum32", "diff32")
    nodes += [helper.make_node("Add", [a, b], [sums[0]]), helper.make_node("Sub", [a, b], [sums[1]])]
    if elem != INT32:
        nodes += [
            helper.make_node("Cast", ["sum32"], ["OUTPUT0"], to=elem),
            helper.make_node("Cast", ["diff32"], ["OUTPUT1"], to=elem),
        ]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [_vi("INPUT0", elem, 16), _vi("INPUT1", elem, 16)],
        [_vi("OUTPUT0", elem, 16), _vi("OUTPUT1", elem, 16)],
    )
    return _model(graph)


def simple_model() -> onnx.ModelProto:
    return _add_sub("simple", INT32)


def simple_int8_model() -> onnx.ModelProto:
    return _add_sub("simple_int8", TensorProto.INT8)


def simple_string_model() -> onnx.ModelProto:
    return _add_sub("simple_string", TensorProto.STRING)


def simple_sequence_model() -> onnx.ModelProto:
    """OUTPUT = READY * (INPUT + START): the first request adds 1, a null request gives 0."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT", "START"], ["started"]),
            helper.make_node("Mul", ["started", "READY"], ["OUTPUT"]),
        ],
        "simple_sequence",
        [_vi("INPUT", INT32, 1), _vi("START", INT32, 1), _vi("READY", INT32, 1)],
        [_vi("OUTPUT", INT32, 1)],
    )
    return _model(graph)


def simple_dyna_sequence_model() -> onnx.ModelProto:
    """OUTPUT = READY * (INPUT + START + END * CORRID): the END request adds the sequence id."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["CORRID"], ["corrid32"], to=INT32),
            helper.make_node("Mul", ["END", "corrid32"], ["end_id"]),
            helper.make_node("Add", ["INPUT", "START"], ["started"]),
            helper.make_node("Add", ["started", "end_id"], ["total"]),
            helper.make_node("Mul", ["total", "READY"], ["OUTPUT"]),
        ],
        "simple_dyna_sequence",
        [
            _vi("INPUT", INT32, 1),
            _vi("START", INT32, 1),
            _vi("END", INT32, 1),
            _vi("READY", INT32, 1),
            _vi("CORRID", TensorProto.UINT64, 1),
        ],
        [_vi("OUTPUT", INT32, 1)],
    )
    return _model(graph)


def simple_string_dyna_sequence_model() -> onnx.ModelProto:
    """ACC_OUT = ACC_IN + INPUT (the running sum: ACC_IN is zeros on START, then the last
    ACC_OUT, kept by the sequence batcher); OUTPUT = READY * (ACC_OUT + END * int(CORRID)),
    CORRID a string holding a decimal number."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ACC_IN", "INPUT"], ["ACC_OUT"]),
            helper.make_node("Cast", ["CORRID"], ["corrid32"], to=INT32),
            helper.make_node("Mul", ["END", "corrid32"], ["end_id"]),
            helper.make_node("Add", ["ACC_OUT", "end_id"], ["total"]),
            helper.make_node("Mul", ["total", "READY"], ["OUTPUT"]),
        ],
        "simple_string_dyna_sequence",
        [
            _vi("INPUT", INT32, 1),
            _vi("START", INT32, 1),
            _vi("END", INT32, 1),
            _vi("READY", INT32, 1),
            _vi("CORRID", TensorProto.STRING, 1),
            _vi("ACC_IN", INT32, 1),
        ],
        [_vi("OUTPUT", INT32, 1), _vi("ACC_OUT", INT32, 1)],
    )
    return _model(graph)  # START is an input the graph ignores: the initial state restarts the sum


def _two_io(dtype: str, dims: str) -> str:
    return f"""\
input [
  {{
    name: "INPUT0"
    data_type: {dtype}
    dims: [ {dims} ]
  }},
  {{
    name: "INPUT1"
    data_type: {dtype}
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: {dtype}
    dims: [ {dims} ]
  }},
  {{
    name: "OUTPUT1"
    data_type: {dtype}
    dims: [ {dims} ]
  }}
]
"""


def _add_sub_config(name: str, dtype: str) -> str:
    return f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n' + _two_io(dtype, "16")


def _flag(name: str, kind: str) -> str:
    return f"""\
    {{
      name: "{name}"
      control [
        {{
          kind: {kind}
          int32_false_true: [ 0, 1 ]
        }}
      ]
    }}"""


def _corrid(data_type: str) -> str:
    return f"""\
    {{
      name: "CORRID"
      control [
        {{
          kind: CONTROL_SEQUENCE_CORRID
          data_type: {data_type}
        }}
      ]
    }}"""


_SEQUENCE_IO = """\
input [
  {
    name: "INPUT"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }
]
output [
  {
    name: "OUTPUT"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }
]
"""

SIMPLE_SEQUENCE_CONFIG = (
    'name: "simple_sequence"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    "sequence_batching {\n  control_input [\n"
    + _flag("START", "CONTROL_SEQUENCE_START")
    + ",\n"
    + _flag("READY", "CONTROL_SEQUENCE_READY")
    + "\n  ]\n}\n"
    + _SEQUENCE_IO
    + "instance_group [\n  {\n    kind: KIND_CPU\n  }\n]\n"
)


def _dyna_config(name: str, corrid_type: str, state: str = "") -> str:
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        "sequence_batching {\n"
        "  max_sequence_idle_microseconds: 10000000\n"
        "  oldest {\n    max_candidate_sequences: 1024\n    max_queue_delay_microseconds: 10000\n  }\n"
        "  control_input [\n"
        + _flag("START", "CONTROL_SEQUENCE_START")
        + ",\n"
        + _flag("END", "CONTROL_SEQUENCE_END")
        + ",\n"
        + _flag("READY", "CONTROL_SEQUENCE_READY")
        + ",\n"
        + _corrid(corrid_type)
        + "\n  ]\n"
        + state
        + "}\n"
        + _SEQUENCE_IO
        + 'parameters [\n  {\n    key: "execute_delay_ms"\n    value: { string_value: "3" }\n  }\n]\n'
        + "instance_group [\n  {\n    count: 2\n    kind: KIND_CPU\n  }\n]\n"
    )


_ACC_STATE = """\
  state [
    {
      input_name: "ACC_IN"
      output_name: "ACC_OUT"
      data_type: TYPE_INT32
      dims: [ 1 ]
      initial_state: { data_type: TYPE_INT32, dims: [ 1 ], zero_data: true, name: "zero" }
    }
  ]
"""

SIMPLE_IDENTITY_CONFIG = """\
name: "simple_identity"
backend: "python"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_STRING
    dims: [ -1 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_STRING
    dims: [ -1 ]
  }
]
"""

SIMPLE_IDENTITY_PY = '''\
"""simple_identity: OUTPUT0 is INPUT0, unchanged."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
'''

REPEAT_INT32_CONFIG = """\
name: "repeat_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy {
  decoupled: True
}
input [
  {
    name: "IN"
    data_type: TYPE_INT32
    dims: [ -1 ]
  },
  {
    name: "DELAY"
    data_type: TYPE_UINT32
    dims: [ -1 ]
  },
  {
    name: "WAIT"
    data_type: TYPE_UINT32
    dims: [ 1 ]
  }
]
output [
  {
    name: "OUT"
    data_type: TYPE_INT32
    dims: [ 1 ]
  },
  {
    name: "IDX"
    data_type: TYPE_UINT32
    dims: [ 1 ]
  }
]
instance_group [{ kind: KIND_CPU }]
"""

REPEAT_INT32_PY = '''\
"""repeat_int32 (decoupled): for a request, one response per element of IN, the i-th after
DELAY[i] ms, with OUT = IN[i] and IDX = i, then the final flag; execute returns after WAIT
ms, so responses of several requests may interleave."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("repeat_int32 needs the decoupled transaction policy")
        self.out_dtype = pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, "OUT")["data_type"])
        self.idx_dtype = pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, "IDX")["data_type"])
        self.active = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().copy()
            delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy().copy()
            wait = pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()
            sender = request.get_response_sender()
            if values.shape != delays.shape:
                shapes = f"{list(values.shape)} and {list(delays.shape)}"
                error = pb_utils.TritonError(f"IN and DELAY differ in shape: {shapes}")
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                continue
            worker = threading.Thread(target=self._respond, args=(sender, values, delays), daemon=True)
            worker.start()
            self.active.append(worker)
            time.sleep(int(wait[0]) / 1000)
        return None

    def _respond(self, sender, values, delays):
        for i, (value, delay) in enumerate(zip(values.tolist(), delays.tolist())):
            time.sleep(delay / 1000)
            outputs = [
                pb_utils.Tensor("OUT", np.array([value], dtype=self.out_dtype)),
                pb_utils.Tensor("IDX", np.array([i], dtype=self.idx_dtype)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for worker in self.active:
            worker.join()
'''


@dataclass(frozen=True, slots=True)
class TritonExample:
    """One model: its name, its ``config.pbtxt`` text and how to make its version-1 file."""

    name: str
    config: str
    build: Callable[[], onnx.ModelProto] | None = None
    """ONNX builder (``1/model.onnx``); None for a Python model."""
    python: str = ""
    """``1/model.py`` source of a Python model."""


TRITON_EXAMPLES: tuple[TritonExample, ...] = (
    TritonExample("simple", _add_sub_config("simple", "TYPE_INT32"), simple_model),
    TritonExample("simple_int8", _add_sub_config("simple_int8", "TYPE_INT8"), simple_int8_model),
    TritonExample("simple_string", _add_sub_config("simple_string", "TYPE_STRING"), simple_string_model),
    TritonExample("simple_sequence", SIMPLE_SEQUENCE_CONFIG, simple_sequence_model),
    TritonExample(
        "simple_dyna_sequence", _dyna_config("simple_dyna_sequence", "TYPE_UINT64"), simple_dyna_sequence_model
    ),
    TritonExample(
        "simple_string_dyna_sequence",
        _dyna_config("simple_string_dyna_sequence", "TYPE_STRING", _ACC_STATE),
        simple_string_dyna_sequence_model,
    ),
    TritonExample("simple_identity", SIMPLE_IDENTITY_CONFIG, python=SIMPLE_IDENTITY_PY),
    TritonExample("repeat_int32", REPEAT_INT32_CONFIG, python=REPEAT_INT32_PY),
)

NAMES: tuple[str, ...] = tuple(e.name for e in TRITON_EXAMPLES)


def make_triton_examples(repo: Path, names: tuple[str, ...] = NAMES, force: bool = False) -> list[Path]:
    """Write the named models (all by default) into the model repository ``repo``; returns
    the files written (unchanged files are left alone unless ``force``)."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown Triton example model(s): {', '.join(sorted(unknown))}")
    written: list[Path] = []
    for ex in TRITON_EXAMPLES:
        if ex.name not in names:
            continue
        model_dir = Path(repo) / ex.name
        if ex.build is not None:
            files = {model_dir / "1" / "model.onnx": ex.build().SerializeToString()}
        else:
            files = {model_dir / "1" / "model.py": ex.python.encode()}
        files[model_dir / "config.pbtxt"] = ex.config.encode()
        for path, data in files.items():
            if write_if_changed(path, data, force):
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("repo", type=Path, help="model repository directory")
    parser.add_argument("--force", action="store_true", help="rewrite files even when unchanged")
    parser.add_argument("--model", action="append", choices=NAMES, help="only this model (repeatable)")
    args = parser.parse_args(argv)
    for path in make_triton_examples(args.repo, tuple(args.model or NAMES), force=args.force):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
