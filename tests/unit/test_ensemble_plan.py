"""``ensemble.plan``: an ensemble's step graph checked against its composing models; each
error names the ensemble and the step."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server import ensemble

MODELS = {
    "pre": """name: "pre" max_batch_size: 8
        input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ 4 ] } ]
        output [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] } ]""",
    "net": """name: "net" max_batch_size: 8
        input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] },
                { name: "OPT", data_type: TYPE_FP32, dims: [ 1 ], optional: true } ]
        output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]""",
    "add": """name: "add" max_batch_size: 8
        input [ { name: "A", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "B", data_type: TYPE_FP32, dims: [ 4 ] } ]
        output [ { name: "SUM", data_type: TYPE_FP32, dims: [ 4 ] } ]""",
    "small": """name: "small" max_batch_size: 2
        input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]
        output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]""",
    "flat": """name: "flat" max_batch_size: 0
        input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]
        output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]""",
}


def lookup(name: str, version: int) -> mc.ModelConfig:
    if name not in MODELS:
        raise ServingError(f"model '{name}' is not available", code=ErrorCode.NOT_FOUND)
    return text_format.Parse(MODELS[name], mc.ModelConfig())


def _config(steps: str, io: str | None = None, batch: int = 8) -> mc.ModelConfig:
    io = (
        io
        or """input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ 4 ] } ]
        output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] } ]"""
    )
    text = f'name: "ens" platform: "ensemble" max_batch_size: {batch} {io} ensemble_scheduling {{ {steps} }}'
    return text_format.Parse(text, mc.ModelConfig())


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'step {{ model_name: "{model}" model_version: -1 {ins} {outs} }}'


CHAIN = _step("pre", {"RAW": "RAW"}, {"X": "x"}) + _step("net", {"IN": "x"}, {"OUT": "Y"})


def test_chain_and_diamond_are_ordered() -> None:
    p = ensemble.plan(
        _config(_step("net", {"IN": "x"}, {"OUT": "Y"}) + _step("pre", {"RAW": "RAW"}, {"X": "x"})), lookup
    )
    assert [s.model for s in p.steps] == ["pre", "net"]  # written in reverse, run in order
    assert p.producer == {"x": 1, "Y": 0} and p.consumers == {"x": (0,), "RAW": (1,)}
    diamond = (
        _step("pre", {"RAW": "RAW"}, {"X": "x"})
        + _step("net", {"IN": "x"}, {"OUT": "a"})
        + _step("net", {"IN": "x"}, {"OUT": "b"})
        + _step("add", {"A": "a", "B": "b"}, {"SUM": "Y"})
    )
    p = ensemble.plan(_config(diamond), lookup)
    assert [s.index for s in p.steps] == [0, 1, 2, 3]
    assert p.consumers["x"] == (1, 2)
    assert ensemble.composing_models(_config(diamond)) == ["pre", "net", "add"]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("", "has no step"),
        (_step("nope", {"IN": "RAW"}, {"OUT": "Y"}), r"step 0 \(model 'nope'\): model 'nope' is not available"),
        (_step("ens", {"IN": "RAW"}, {"OUT": "Y"}), "is the ensemble itself"),
        (_step("pre", {"RAW": "RAW", "BOGUS": "RAW"}, {"X": "Y"}), "maps 'BOGUS', which is not an input"),
        (_step("pre", {"RAW": "RAW"}, {"NOPE": "Y"}), "maps 'NOPE', which is not an output"),
        (_step("pre", {"RAW": "RAW"}, {}), "maps no output"),
        (_step("add", {"A": "RAW"}, {"SUM": "Y"}), "UINT8 for the ensemble input but FP32 for step 0"),
        (CHAIN.replace('"x" }', '"z" }', 1), "reads 'x', which is neither an ensemble input nor any step's output"),
        (_step("pre", {"RAW": "RAW"}, {"X": "x"}) + _step("net", {"IN": "x"}, {"OUT": "x"}), "written by step 0 and"),
        (_step("pre", {"RAW": "RAW"}, {"X": "RAW"}), "writes 'RAW', which is an ensemble input"),
        (_step("pre", {"RAW": "RAW"}, {"X": "x"}), "no step writes the ensemble output 'Y'"),
        (
            _step("pre", {"RAW": "RAW"}, {"X": "x"}) + _step("net", {"IN": "x"}, {"OUT": "Y"})
            + _step("net", {"IN": "x"}, {"OUT": "unused"}),
            r"step 2 \(model 'net'\) writes 'unused', which no step reads",
        ),
        (_step("small", {"IN": "x"}, {"OUT": "Y"}), r"batch size 8, but step 0 \(model 'small'\) allows at most 2"),
        (
            _step("pre", {"RAW": "RAW"}, {"X": "x"}) + _step("add", {"A": "x", "B": "b"}, {"SUM": "a"})
            + _step("add", {"A": "a", "B": "x"}, {"SUM": "b"}) + _step("net", {"IN": "a"}, {"OUT": "Y"}),
            "the steps form a cycle: step 1 \\(model 'add'\\), step 2 \\(model 'add'\\)",
        ),
        (_step("add", {"A": "x"}, {"SUM": "Y"}), "leaves the model's input 'B' unmapped"),
    ],
)  # fmt: skip
def test_invalid_ensembles_name_the_step(steps: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ensemble.plan(_config(steps), lookup)


def test_unused_ensemble_input_and_shapes() -> None:
    io = """input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ 4 ] },
                { name: "EXTRA", data_type: TYPE_FP32, dims: [ 1 ] } ]
        output [ { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] } ]"""
    with pytest.raises(InvalidInput, match="no step reads the ensemble input 'EXTRA'"):
        ensemble.plan(_config(CHAIN, io), lookup)
    io = """input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ 4 ] } ]
        output [ { name: "Y", data_type: TYPE_FP32, dims: [ 5 ] } ]"""
    with pytest.raises(InvalidInput, match=r"tensor 'Y' has shape \[5\] for the ensemble output but \[4\] for step 1"):
        ensemble.plan(_config(CHAIN, io), lookup)
    # the optional input may stay unmapped; a variable dim matches a fixed one
    ensemble.plan(_config(CHAIN), lookup)


def test_non_batching_ensemble_sees_batch_dims() -> None:
    """An ensemble with max_batch_size 0 sees a batching model's tensors with their batch
    dimension, so it can mix batching and non-batching models."""
    io = """input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ -1, 4 ] } ]
        output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]"""
    steps = _step("pre", {"RAW": "RAW"}, {"X": "x"}) + _step("flat", {"IN": "x"}, {"OUT": "Y"})
    ensemble.plan(_config(steps, io, batch=0), lookup)
    with pytest.raises(InvalidInput, match="allows at most 0"):
        ensemble.plan(_config(steps, io.replace("-1, ", ""), batch=4), lookup)


def _on(kind: str, extra: str = "", backend: str = "pytorch") -> str:
    return f'backend: "{backend}" instance_group [ {{ kind: {kind}, count: 1 }} ] {extra}'


@pytest.mark.parametrize(
    ("pre", "net", "resident"),
    [
        (_on("KIND_GPU"), _on("KIND_GPU"), {"X"}),
        (_on("KIND_GPU"), _on("KIND_GPU", backend="python"), {"X"}),  # any GPU reader opens the handle
        (_on("KIND_GPU"), _on("KIND_CPU"), set()),  # a CPU reader gets host memory
        (_on("KIND_GPU"), "", set()),  # no instance group: the placement is not known here
        (_on("KIND_GPU", backend="python"), _on("KIND_GPU"), {"X"}),  # its worker keeps GPU tensors there
        (_on("KIND_GPU", "response_cache { enable: true }"), _on("KIND_GPU"), set()),
        (_on("KIND_GPU"), _on("KIND_GPU", "response_cache { enable: true }"), set()),  # its key reads the input
        (_on("KIND_GPU"), _on("KIND_GPU", "sequence_batching { }"), set()),
    ],
)
def test_step_outputs_stay_on_the_gpu_only_between_gpu_steps(pre: str, net: str, resident: set[str]) -> None:
    extra = {"pre": pre, "net": net}

    def placed(name: str, version: int) -> mc.ModelConfig:
        cfg = lookup(name, version)
        text_format.Parse(extra.get(name, ""), cfg)
        return cfg

    p = ensemble.plan(_config(CHAIN), placed)
    steps = {s.model: s for s in p.steps}
    assert steps["pre"].on_gpu == resident
    assert steps["net"].on_gpu == frozenset()  # its output is the ensemble's: the router sends it


def test_an_ensemble_output_read_by_a_later_step_stays_in_host_memory() -> None:
    gpu = _on("KIND_GPU")

    def placed(name: str, version: int) -> mc.ModelConfig:
        cfg = lookup(name, version)
        text_format.Parse(gpu, cfg)
        return cfg

    io = """input [ { name: "RAW", data_type: TYPE_UINT8, dims: [ 4 ] } ]
        output [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "Y", data_type: TYPE_FP32, dims: [ 4 ] } ]"""
    p = ensemble.plan(_config(CHAIN, io), placed)
    assert {s.model: s.on_gpu for s in p.steps} == {"pre": frozenset(), "net": frozenset()}
