"""``validation.validate``: requests checked against a model's configuration."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto import dtypes
from shoal.proto.errors import ErrorCode, InvalidInput
from shoal.proto.errortexts import IMPLICIT_BATCH_NOTE as NOTE
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.models import ModelVersion
from shoal.server.models.version import tensor_specs
from shoal.server.types import InferRequest, InputTensor, RequestedOutput
from shoal.server.validation import validate

ID = "[request id: <id_unknown>] "
"""How Triton starts the texts of its request checks (these requests have no id)."""

BATCHING = """
name: "bm" backend: "python" max_batch_size: 8
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ -1, 2 ] },
  { name: "OPT" data_type: TYPE_FP32 dims: [ 1 ] optional: true }
]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "Z" data_type: TYPE_INT32 dims: [ -1 ] } ]
"""

PLAIN = """
name: "pm" backend: "python" max_batch_size: 0
input [
  { name: "X" data_type: TYPE_UINT8 dims: [ 2, 3 ] },
  { name: "S" data_type: TYPE_STRING dims: [ -1 ] }
]
output [ { name: "Y" data_type: TYPE_UINT8 dims: [ 2, 3 ] } ]
"""


def _mv(text: str, version: int = 1) -> ModelVersion:
    """A ModelVersion as ``ModelManager._new_version`` builds it."""
    config = text_format.Parse(text, mc.ModelConfig())
    mv = ModelVersion(name=config.name, version=version, config=config)
    mv.inputs = tensor_specs(list(config.input))
    mv.outputs = tensor_specs(list(config.output))
    mv.required_inputs = sum(1 for t in mv.inputs.values() if not t.optional)
    return mv


def _t(name: str, datatype: str, shape: tuple[int, ...], data: bytes | None = None) -> InputTensor:
    """An input; ``data`` defaults to zeros of the size the shape needs."""
    if data is None:
        data = b"\x00" * (dtypes.element_count(shape) * dtypes.BY_PROTOCOL[datatype].itemsize)
    return InputTensor(name=name, datatype=datatype, shape=shape, data=data)


def _req(*inputs: InputTensor, outputs: list[str] | None = None, model: str = "bm") -> InferRequest:
    outs = None if outputs is None else [RequestedOutput(o) for o in outputs]
    return InferRequest(model_name=model, model_version=1, inputs=list(inputs), outputs=outs)


def _ok_batch(n: int = 2) -> list[InputTensor]:
    return [_t("A", "FP32", (n, 4)), _t("B", "INT32", (n, 3, 2))]


def _invalid(mv: ModelVersion, req: InferRequest) -> str:
    with pytest.raises(InvalidInput) as ei:
        validate(mv, req)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    return ei.value.message


# ---- accepted requests ---------------------------------------------------------------------


def test_valid_batched_request() -> None:
    req = _req(*_ok_batch())
    validate(_mv(BATCHING), req)
    assert [t.shape for t in req.inputs] == [(2, 4), (2, 3, 2)]


def test_optional_input_may_be_omitted_or_given() -> None:
    mv = _mv(BATCHING)
    validate(mv, _req(*_ok_batch()))
    validate(mv, _req(*_ok_batch(), _t("OPT", "FP32", (2, 1))))


def test_input_order_does_not_matter() -> None:
    validate(_mv(BATCHING), _req(*reversed(_ok_batch())))


@pytest.mark.parametrize("batch", [1, 8])
def test_batch_size_within_limit(batch: int) -> None:
    validate(_mv(BATCHING), _req(*_ok_batch(batch)))


def test_variable_dims_accept_any_size() -> None:
    mv = _mv(BATCHING)
    for n in (0, 1, 17):
        validate(mv, _req(_t("A", "FP32", (1, 4)), _t("B", "INT32", (1, n, 2))))


def test_valid_non_batching_request() -> None:
    s = dtypes.serialize_bytes(np.array([b"a", b"bc", b""], dtype=np.object_))
    req = _req(_t("X", "UINT8", (2, 3)), _t("S", "BYTES", (3,), s), model="pm")
    validate(_mv(PLAIN), req)
    assert req.inputs[0].shape == (2, 3)


def test_bytes_inputs_have_no_fixed_byte_size() -> None:
    req = _req(_t("X", "UINT8", (2, 3)), _t("S", "BYTES", (1,), b"\x03\x00\x00\x00abc"), model="pm")
    validate(_mv(PLAIN), req)


def test_known_requested_outputs() -> None:
    validate(_mv(BATCHING), _req(*_ok_batch(), outputs=["Z", "Y"]))
    validate(_mv(BATCHING), _req(*_ok_batch(), outputs=[]))


# ---- refused requests ----------------------------------------------------------------------


def test_unknown_input_name() -> None:
    msg = _invalid(_mv(BATCHING), _req(*_ok_batch(), _t("C", "FP32", (2, 4))))
    assert msg == "unexpected inference input 'C' for model 'bm'"


def test_input_name_is_case_sensitive() -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("a", "FP32", (2, 4)), _t("B", "INT32", (2, 3, 2))))
    assert msg == "unexpected inference input 'a' for model 'bm'"


def test_duplicate_input() -> None:
    a, b = _ok_batch()
    msg = _invalid(_mv(BATCHING), _req(a, b, _t("A", "FP32", (2, 4))))
    assert msg == f"{ID}input 'A' already exists in request"


@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT32", "BYTES"])
def test_wrong_datatype(datatype: str) -> None:
    bad = InputTensor("A", datatype, (2, 4), b"")
    msg = _invalid(_mv(BATCHING), _req(bad, _ok_batch()[1]))
    assert msg == f"{ID}inference input 'A' data-type is '{datatype}', but model 'bm' expects 'FP32'"


def test_unknown_datatype_is_invalid() -> None:
    msg = _invalid(_mv(BATCHING), _req(InputTensor("A", "FLOAT", (2, 4), b""), _ok_batch()[1]))
    assert msg == f"{ID}inference input 'A' data-type is '<invalid>', but model 'bm' expects 'FP32'"


def test_request_id_is_named() -> None:
    req = _req(InputTensor("A", "FP64", (2, 4), b""), _ok_batch()[1])
    req.id = "42"
    msg = _invalid(_mv(BATCHING), req)
    assert msg == "[request id: 42] inference input 'A' data-type is 'FP64', but model 'bm' expects 'FP32'"


@pytest.mark.parametrize(
    ("shape", "expect"),
    [
        ((2, 5), "[-1,4]"),
        ((2, 4, 1), "[-1,4]"),
        ((2,), "[-1,4]"),
    ],
)
def test_wrong_shape_batching(shape: tuple[int, ...], expect: str) -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("A", "FP32", shape), _t("B", "INT32", (2, 3, 2))))
    got = "[" + ",".join(map(str, shape)) + "]"
    assert msg == f"{ID}unexpected shape for input 'A' for model 'bm'. Expected {expect}, got {got}. {NOTE}"


def test_wrong_shape_variable_dim_rank() -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("A", "FP32", (2, 4)), _t("B", "INT32", (2, 3, 3))))
    assert msg == f"{ID}unexpected shape for input 'B' for model 'bm'. Expected [-1,-1,2], got [2,3,3]. {NOTE}"


@pytest.mark.parametrize("shape", [(3, 2), (1, 2, 3), (6,), ()])
def test_wrong_shape_non_batching(shape: tuple[int, ...]) -> None:
    s = dtypes.serialize_bytes(np.array([b"a"], dtype=np.object_))
    msg = _invalid(_mv(PLAIN), _req(_t("X", "UINT8", shape), _t("S", "BYTES", (1,), s), model="pm"))
    got = "[" + ",".join(map(str, shape)) + "]"
    # Triton's text for a non-batching model ends with ". " (where the batching note goes)
    assert msg == f"{ID}unexpected shape for input 'X' for model 'pm'. Expected [2,3], got {got}. "


@pytest.mark.parametrize("shape", [(2, -1), (2, -4), (-1, 4)])
def test_unspecified_dimension(shape: tuple[int, ...]) -> None:
    bad = InputTensor("A", "FP32", shape, b"")
    msg = _invalid(_mv(BATCHING), _req(bad, _ok_batch()[1]))
    got = "[" + ",".join(map(str, shape)) + "]"
    assert msg == f"{ID}All input dimensions should be specified for input 'A' for model 'bm', got {got}"


def test_unspecified_dimension_after_a_mismatch_is_a_shape_error() -> None:
    bad = InputTensor("B", "INT32", (2, 3, -1, 1), b"")
    msg = _invalid(_mv(BATCHING), _req(_ok_batch()[0], bad))
    assert msg.startswith(f"{ID}unexpected shape for input 'B' for model 'bm'. Expected [-1,-1,2], got [2,3,-1,1]")


def test_batching_model_needs_batch_dimension() -> None:
    mv = _mv(
        'name: "s" backend: "python" max_batch_size: 4 '
        'input [ { name: "A" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]'
    )
    msg = _invalid(mv, _req(_t("A", "FP32", ())))
    assert msg == f"{ID}input 'A' has no shape but model requires batch dimension for 's'"


def test_batch_larger_than_max_batch_size() -> None:
    msg = _invalid(_mv(BATCHING), _req(*_ok_batch(9)))
    assert msg == f"{ID}inference request batch-size must be <= 8 for 'bm'"


def test_inconsistent_batch_sizes() -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("A", "FP32", (2, 4)), _t("B", "INT32", (3, 1, 2))))
    assert msg == f"{ID}input 'B' batch size does not match other inputs for 'bm'"


def test_inconsistent_batch_size_of_optional_input() -> None:
    msg = _invalid(_mv(BATCHING), _req(*_ok_batch(2), _t("OPT", "FP32", (1, 1))))
    assert msg == f"{ID}input 'OPT' batch size does not match other inputs for 'bm'"


@pytest.mark.parametrize("nbytes", [0, 31, 33, 64])
def test_byte_size_mismatch(nbytes: int) -> None:
    bad = _t("A", "FP32", (2, 4), b"\x00" * nbytes)
    msg = _invalid(_mv(BATCHING), _req(bad, _ok_batch()[1]))
    assert msg == f"{ID}input byte size mismatch for input 'A' for model 'bm'. Expected 32, got {nbytes}"


def test_byte_size_of_memoryview() -> None:
    buf = memoryview(bytearray(64))[:32]
    validate(_mv(BATCHING), _req(InputTensor("A", "FP32", (2, 4), buf), _ok_batch()[1]))


def test_missing_required_input() -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("A", "FP32", (2, 4)), _t("OPT", "FP32", (2, 1))))
    # within the count Triton checks (2 to 3), yet 'B' is missing: the count's text names it
    assert msg == (
        f"{ID}expected number of inputs between 2 and 3 but got 2 inputs for model 'bm'. Got input(s) "
        "['A','OPT'], but missing required input(s) ['B']. Please provide all required input(s)."
    )


def test_no_inputs() -> None:
    msg = _invalid(_mv(BATCHING), _req())
    assert msg == (
        f"{ID}expected number of inputs between 2 and 3 but got 0 inputs for model 'bm'. Got input(s) [], "
        "but missing required input(s) ['A','B']. Please provide all required input(s)."
    )


def test_input_count_without_optional_inputs() -> None:
    s = dtypes.serialize_bytes(np.array([b"a"], dtype=np.object_))
    msg = _invalid(_mv(PLAIN), _req(_t("S", "BYTES", (1,), s), model="pm"))
    assert msg == (
        f"{ID}expected 2 inputs but got 1 inputs for model 'pm'. Got input(s) ['S'], but missing required "
        "input(s) ['X']. Please provide all required input(s)."
    )


def test_too_many_inputs_is_a_count_error() -> None:
    # Triton counts before it looks at names; with nothing missing its list is written "]"
    extra = [_t("A", "FP32", (2, 4)), _t("B", "INT32", (2, 3, 2)), _t("OPT", "FP32", (2, 1)), _t("W", "FP32", (2,))]
    msg = _invalid(_mv(BATCHING), _req(*extra))
    assert msg == (
        f"{ID}expected number of inputs between 2 and 3 but got 4 inputs for model 'bm'. Got input(s) "
        "['A','B','OPT','W'], but missing required input(s) ]. Please provide all required input(s)."
    )


def test_outputs_are_checked_first() -> None:
    msg = _invalid(_mv(BATCHING), _req(_t("A", "FP64", (2, 4)), outputs=["W"]))
    assert msg == "unexpected inference output 'W' for model 'bm'"


def test_unknown_requested_output() -> None:
    msg = _invalid(_mv(BATCHING), _req(*_ok_batch(), outputs=["Y", "W"]))
    assert msg == "unexpected inference output 'W' for model 'bm'"


def test_input_name_is_not_an_output_name() -> None:
    msg = _invalid(_mv(BATCHING), _req(*_ok_batch(), outputs=["A"]))
    assert msg == "unexpected inference output 'A' for model 'bm'"


# ---- reshape -------------------------------------------------------------------------------


def _reshape_model(max_batch: int, dims: str, reshape: str, datatype: str = "TYPE_FP32") -> ModelVersion:
    return _mv(
        f'name: "r" backend: "python" max_batch_size: {max_batch} '
        f'input [ {{ name: "I" data_type: {datatype} dims: [ {dims} ] reshape: {{ shape: [ {reshape} ] }} }} ]'
    )


@pytest.mark.parametrize(
    ("max_batch", "dims", "reshape", "shape", "expected"),
    [
        (0, "4", "2, 2", (4,), (2, 2)),
        (0, "1", "", (1,), ()),
        (0, "2, 3", "6", (2, 3), (6,)),
        (0, "-1", "-1, 2", (6,), (3, 2)),
        (0, "-1", "2, -1", (8,), (2, 4)),
        (4, "4", "2, 2", (3, 4), (3, 2, 2)),
        (4, "1", "", (2, 1), (2,)),
        (4, "-1", "-1, 3", (2, 9), (2, 3, 3)),
        (4, "2, -1", "-1", (1, 2, 5), (1, 10)),
    ],
)
def test_reshape_applied(
    max_batch: int, dims: str, reshape: str, shape: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    mv = _reshape_model(max_batch, dims, reshape)
    req = _req(_t("I", "FP32", shape))
    validate(mv, req)
    assert req.inputs[0].shape == expected


def test_reshape_checks_config_dims_not_reshape() -> None:
    mv = _reshape_model(0, "4", "2, 2")
    msg = _invalid(mv, _req(_t("I", "FP32", (2, 2))))
    assert msg == f"{ID}unexpected shape for input 'I' for model 'r'. Expected [4], got [2,2]. "


def test_byte_size_checked_before_reshape() -> None:
    mv = _reshape_model(0, "4", "2, 2")
    msg = _invalid(mv, _req(_t("I", "FP32", (4,), b"\x00" * 8)))
    assert msg == f"{ID}input byte size mismatch for input 'I' for model 'r'. Expected 16, got 8"


def test_specs_from_config() -> None:
    mv = _mv(BATCHING)
    assert mv.required_inputs == 2
    a = mv.inputs["A"]
    assert (a.datatype, a.dims, a.optional, a.reshape) == ("FP32", (4,), False, None)
    assert mv.inputs["OPT"].optional
    assert list(mv.outputs) == ["Y", "Z"]
    spec = _reshape_model(0, "1", "").inputs["I"]
    assert spec.reshape == ()
