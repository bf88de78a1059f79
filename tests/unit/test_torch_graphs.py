"""Which CUDA graphs a PyTorch GPU instance captures (``workers/backends/torchgraphs.plan``):
``optimization.cuda.graphs`` alone gives batch sizes 1, 2, 4, ... and ``max_batch_size``, each
taking the batches above the one before; ``graph_spec`` gives its own sizes, shapes and lower
bounds; variable dimensions without a spec give none. Capture and replay run on the GPU
(tests/gpu/test_pytorch_gpu.py)."""

from __future__ import annotations

from google.protobuf import text_format

from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends.torchgraphs import GraphShape, plan

BASE = """name: "m" backend: "pytorch" max_batch_size: 12
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 4 ] }, { name: "y" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "o__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def _config(extra: str, base: str = BASE) -> mc.ModelConfig:
    return text_format.Parse(base + extra, mc.ModelConfig())


def test_no_graphs_unless_asked() -> None:
    assert plan(_config(""), ["x"]) == []
    assert plan(_config("optimization { cuda { graphs: false } }"), ["x"]) == []


def test_default_ladder_for_fixed_shapes() -> None:
    shapes = plan(_config("optimization { cuda { graphs: true } }"), ["x"])
    assert [(s.batch, s.lower) for s in shapes] == [(1, 1), (2, 2), (4, 3), (8, 5), (12, 9)]
    assert all(s.inputs == (("x", (3, 4)),) for s in shapes)


def test_variable_dims_need_a_spec() -> None:
    assert plan(_config("optimization { cuda { graphs: true } }"), ["x", "y"]) == []
    spec = """optimization { cuda { graphs: true
      graph_spec { batch_size: 8 input { key: "y" value { dim: [ 5 ] } } graph_lower_bound { batch_size: 3 } }
      graph_spec { batch_size: 2 input { key: "y" value { dim: [ 7 ] } } } } }"""
    assert plan(_config(spec), ["x", "y"]) == [
        GraphShape(8, 3, (("x", (3, 4)), ("y", (5,)))),
        GraphShape(2, 2, (("x", (3, 4)), ("y", (7,)))),
    ]


def test_a_model_that_does_not_batch_gets_one_graph() -> None:
    base = BASE.replace("max_batch_size: 12", "max_batch_size: 0")
    assert plan(_config("optimization { cuda { graphs: true } }", base), ["x"]) == [GraphShape(0, 0, (("x", (3, 4)),))]


def test_inputs_the_configuration_lacks_give_no_graph() -> None:
    # sequence control inputs and the like: filled by the server, shapes not in the config
    assert plan(_config("optimization { cuda { graphs: true } }"), ["x", "START"]) == []
