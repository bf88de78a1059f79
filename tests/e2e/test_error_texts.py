"""Triton's exact error texts and statuses (``shoal.proto.errortexts``), end to end: each bad
request goes to the real server over HTTP and gRPC (``tritonclient``; raw HTTP bodies and
raw gRPC messages where ``tritonclient`` cannot build the mistake) and the answer must be
Triton's text with Triton's HTTP status and gRPC code. Where Triton answers a client's
mistake with INTERNAL (HTTP 500), Shoal keeps the text and answers 400 / INVALID_ARGUMENT
(``ErrorText.triton_code``); those cases say so."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from shoal.proto.errortexts import IMPLICIT_BATCH_NOTE
from tests.e2e.server import ServerProcess, make_repository

pytestmark = pytest.mark.timeout(120)

ID = "[request id: <id_unknown>] "
"""How Triton starts the texts of its request checks when the request has no id."""
TRANSPORTS = ("http", "grpc")
HTTP_STATUS = {
    "INVALID_ARGUMENT": "400",
    "NOT_FOUND": "404",
    "ALREADY_EXISTS": "400",
    "UNAVAILABLE": "503",
    "UNIMPLEMENTED": "501",
}
"""Triton's HTTP status of each gRPC code used here (http_server.cc HttpCodeFromError)."""
BROKEN_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        raise pb_utils.TritonModelException("broken on purpose")

    def execute(self, requests):
        return []
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pytest.importorskip("onnxruntime")
    repo = make_repository(
        tmp_path_factory.mktemp("repo"), "simple_onnx", "add_sub", "accumulator", "repeat", "identity_fp32"
    )
    server = ServerProcess(repo, "--model-control-mode=explicit", "--load-model=*").start()
    # written once the server runs: a model that fails to load (for the load's error)
    broken = repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.py").write_text(BROKEN_MODEL)
    (broken / "config.pbtxt").write_text(
        'name: "broken" backend: "python" max_batch_size: 0\n'
        'input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
    )
    yield server
    rc = server.terminate()
    assert rc == 0, server.log
    assert not server.segments(), server.segments()


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(srv: ServerProcess, transport: str) -> Any:
    """A tritonclient client of ``transport``, closed after the test."""
    c: Any = (
        httpclient.InferenceServerClient(srv.url)
        if transport == "http"
        else grpcclient.InferenceServerClient(srv.grpc_url)
    )
    _OPEN.append(c)
    return c


def refused(fn: Callable[[], object]) -> tuple[str, str]:
    """``(status, message)`` of the InferenceServerException that ``fn`` raises; the status
    as the HTTP client reports it ("400") or the gRPC code's name ("INVALID_ARGUMENT")."""
    with pytest.raises(InferenceServerException) as err:
        fn()
    status = err.value.status() or ""
    return status.removeprefix("StatusCode."), err.value.message() or ""


def expect(transport: str, code: str) -> str:
    """The status ``refused`` reports for gRPC ``code`` over ``transport``."""
    return HTTP_STATUS[code] if transport == "http" else code


def tensor(transport: str, name: str, shape: list[int], datatype: str, data: np.ndarray | None = None) -> Any:
    mod = httpclient if transport == "http" else grpcclient
    t = mod.InferInput(name, shape, datatype)
    if data is None:
        data = np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32)
    t.set_data_from_numpy(data)
    return t


def simple_inputs(transport: str, shape0: list[int] | None = None, shape1: list[int] | None = None) -> list[Any]:
    """Valid inputs of ``simple_onnx`` (INT32 [-1,16] twice; Triton's "simple"), or with other shapes."""
    return [
        tensor(transport, "INPUT0", shape0 or [1, 16], "INT32"),
        tensor(transport, "INPUT1", shape1 or [1, 16], "INT32"),
    ]


def add_sub_inputs(transport: str, n: int = 4) -> list[Any]:
    return [tensor(transport, "INPUT0", [n], "FP32"), tensor(transport, "INPUT1", [4], "FP32")]


# ---- model lookup --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_model_and_version(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    assert refused(lambda: c.infer("nope", simple_inputs(transport))) == (
        expect(transport, "INVALID_ARGUMENT"),
        "Request for unknown model: 'nope' is not found",
    )
    assert refused(lambda: c.infer("simple_onnx", simple_inputs(transport), model_version="7")) == (
        expect(transport, "NOT_FOUND"),
        "Request for unknown model: 'simple_onnx' version 7 is not found",
    )
    assert refused(lambda: c.get_model_metadata("nope")) == (
        expect(transport, "INVALID_ARGUMENT"),
        "Request for unknown model: 'nope' is not found",
    )
    assert refused(lambda: c.get_inference_statistics("nope")) == (
        expect(transport, "INVALID_ARGUMENT"),
        "requested model 'nope' is not available",
    )
    assert refused(lambda: c.get_inference_statistics("simple_onnx", "7")) == (
        expect(transport, "INVALID_ARGUMENT"),
        "requested model version is not available for model 'simple_onnx'",
    )


def test_unparsable_version_grpc(srv: ServerProcess) -> None:
    c = client(srv, "grpc")
    assert refused(lambda: c.infer("simple_onnx", simple_inputs("grpc"), model_version="x1")) == (
        "INVALID_ARGUMENT",
        "failed to get model version from specified version string 'x1' (details: stol), version should be an "
        "integral value > 0",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unloaded_model(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    c.unload_model("identity_fp32")
    try:
        x = [tensor(transport, "INPUT0", [2], "FP32")]
        assert refused(lambda: c.infer("identity_fp32", x)) == (
            expect(transport, "NOT_FOUND"),
            "Request for unknown model: 'identity_fp32' has no available versions",
        )
        assert refused(lambda: c.infer("identity_fp32", x, model_version="1")) == (
            expect(transport, "UNAVAILABLE"),
            "Request for unknown model: 'identity_fp32' version 1 is not at ready state",
        )
    finally:
        c.load_model("identity_fp32")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_load_errors(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    # Triton's code is INTERNAL here; a client's mistake is a 400 in Shoal
    assert refused(lambda: c.load_model("not_in_repository")) == (
        expect(transport, "INVALID_ARGUMENT"),
        "failed to load 'not_in_repository', failed to poll from model repository",
    )
    status, message = refused(lambda: c.load_model("broken"))
    assert status == expect(transport, "INVALID_ARGUMENT")
    assert message.startswith("load failed for model 'broken': version 1 is at UNAVAILABLE state: "), message
    assert "broken on purpose" in message and message.endswith(";\n"), message
    if transport == "grpc":  # an empty name is no HTTP route
        assert refused(lambda: c.load_model(" ")) == (
            "INVALID_ARGUMENT",
            "Model name cannot be empty. Please enter a valid name to deploy.",
        )


# ---- the request checks (Triton's InferenceRequest::Normalize) -----------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_input_names_and_count(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    a, _ = simple_inputs(transport)
    assert refused(lambda: c.infer("simple_onnx", [a])) == (
        expect(transport, "INVALID_ARGUMENT"),
        f"{ID}expected 2 inputs but got 1 inputs for model 'simple_onnx'. Got input(s) ['INPUT0'], but missing "
        "required input(s) ['INPUT1']. Please provide all required input(s).",
    )
    nope = tensor(transport, "NOPE", [1, 16], "INT32")
    assert refused(lambda: c.infer("simple_onnx", [a, nope])) == (
        expect(transport, "INVALID_ARGUMENT"),
        "unexpected inference input 'NOPE' for model 'simple_onnx'",
    )
    mod = httpclient if transport == "http" else grpcclient
    out = [mod.InferRequestedOutput("NOPE")]
    assert refused(lambda: c.infer("simple_onnx", simple_inputs(transport), outputs=out)) == (
        expect(transport, "INVALID_ARGUMENT"),
        "unexpected inference output 'NOPE' for model 'simple_onnx'",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_datatype(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    x = [tensor(transport, "INPUT0", [1, 16], "FP32"), simple_inputs(transport)[1]]
    assert refused(lambda: c.infer("simple_onnx", x)) == (
        expect(transport, "INVALID_ARGUMENT"),
        f"{ID}inference input 'INPUT0' data-type is 'FP32', but model 'simple_onnx' expects 'INT32'",
    )
    # the request's id replaces <id_unknown>
    assert refused(lambda: c.infer("simple_onnx", x, request_id="17")) == (
        expect(transport, "INVALID_ARGUMENT"),
        "[request id: 17] inference input 'INPUT0' data-type is 'FP32', but model 'simple_onnx' expects 'INT32'",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shapes_and_batch_sizes(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    invalid = expect(transport, "INVALID_ARGUMENT")
    assert refused(lambda: c.infer("simple_onnx", simple_inputs(transport, [1, 8]))) == (
        invalid,
        f"{ID}unexpected shape for input 'INPUT0' for model 'simple_onnx'. Expected [-1,16], got [1,8]. "
        + IMPLICIT_BATCH_NOTE,
    )
    assert refused(lambda: c.infer("add_sub", add_sub_inputs(transport, 5))) == (
        invalid,
        f"{ID}unexpected shape for input 'INPUT0' for model 'add_sub'. Expected [4], got [5]. ",
    )
    assert refused(lambda: c.infer("simple_onnx", simple_inputs(transport, [9, 16], [9, 16]))) == (
        invalid,
        f"{ID}inference request batch-size must be <= 8 for 'simple_onnx'",
    )
    assert refused(lambda: c.infer("simple_onnx", simple_inputs(transport, [1, 16], [2, 16]))) == (
        invalid,
        f"{ID}input 'INPUT1' batch size does not match other inputs for 'simple_onnx'",
    )
    # a shape without the batch dimension: its first dimension is taken as the batch size
    # (16 > 8 is refused first, as Triton does), then the rest must match
    no_batch = [tensor(transport, "INPUT0", [16], "INT32"), tensor(transport, "INPUT1", [16], "INT32")]
    assert refused(lambda: c.infer("simple_onnx", no_batch)) == (
        invalid,
        f"{ID}inference request batch-size must be <= 8 for 'simple_onnx'",
    )
    no_batch = [tensor(transport, "INPUT0", [4], "INT32"), tensor(transport, "INPUT1", [4], "INT32")]
    assert refused(lambda: c.infer("simple_onnx", no_batch)) == (
        invalid,
        f"{ID}unexpected shape for input 'INPUT0' for model 'simple_onnx'. Expected [-1,16], got [4]. "
        + IMPLICIT_BATCH_NOTE,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_byte_size(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    a, b = simple_inputs(transport)
    short = tensor(transport, "INPUT0", [1, 10], "INT32")
    short.set_shape([1, 16])  # 40 bytes of data for a [1,16] INT32 tensor
    assert refused(lambda: c.infer("simple_onnx", [short, b])) == (
        expect(transport, "INVALID_ARGUMENT"),
        f"{ID}input byte size mismatch for input 'INPUT0' for model 'simple_onnx'. Expected 64, got 40",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unspecified_dimension(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    a, b = simple_inputs(transport)
    a.set_shape([1, -1])
    status, message = refused(lambda: c.infer("simple_onnx", [a, b]))
    assert status == expect(transport, "INVALID_ARGUMENT")
    if transport == "http":  # Triton's JSON reader refuses it (its code is INTERNAL there)
        assert message == "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"
    else:
        assert message == (
            f"{ID}All input dimensions should be specified for input 'INPUT0' for model 'simple_onnx', got [1,-1]"
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decoupled_model_through_infer(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    x = [tensor(transport, "IN", [2], "INT32")]
    text = (
        "HTTP end point doesn't support models with decoupled transaction policy"
        if transport == "http"
        else "ModelInfer RPC doesn't support models with decoupled transaction policy"
    )
    assert refused(lambda: c.infer("repeat", x)) == (expect(transport, "UNIMPLEMENTED"), text)


# ---- sequence batcher ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sequence_errors(srv: ServerProcess, transport: str) -> None:
    c = client(srv, transport)
    one = [tensor(transport, "INPUT", [1, 1], "INT32")]
    invalid = expect(transport, "INVALID_ARGUMENT")
    assert refused(lambda: c.infer("accumulator", one)) == (
        invalid,
        "inference request to model 'accumulator' must specify a non-zero or non-empty correlation ID",
    )
    assert refused(lambda: c.infer("accumulator", one, sequence_id=4242)) == (
        invalid,
        "inference request for sequence 4242 to model 'accumulator' must specify the START flag on the first "
        "request of the sequence",
    )
    two = [tensor(transport, "INPUT", [2, 1], "INT32")]
    assert refused(lambda: c.infer("accumulator", two, sequence_id=4243, sequence_start=True)) == (
        invalid,
        "inference request to model 'accumulator' must specify batch-size 1 due to requirements of sequence batcher",
    )
    assert refused(lambda: c.infer("accumulator", one, sequence_id="text", sequence_start=True)) == (
        invalid,
        f"{ID}sequence batching control 'CORRID' data-type is 'BYTES', but model 'accumulator' expects 'UINT64'",
    )


# ---- shared memory -------------------------------------------------------------------------------


@pytest.fixture
def region(srv: ServerProcess) -> Iterator[str]:
    """A 64-byte system shared-memory object; yields its key."""
    key = f"/errortexts_{srv.pid}"
    handle = shm.create_shared_memory_region("errortexts", key, 64)
    try:
        yield key
    finally:
        for transport in TRANSPORTS:
            client(srv, transport).unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shared_memory_errors(srv: ServerProcess, transport: str, region: str) -> None:
    c = client(srv, transport)
    assert refused(lambda: c.get_system_shared_memory_status("nope")) == (
        expect(transport, "NOT_FOUND"),
        "Unable to find system shared memory region: 'nope'",
    )
    assert refused(lambda: c.register_system_shared_memory("big", region, 65)) == (
        expect(transport, "INVALID_ARGUMENT"),
        "failed to register shared memory region 'big': invalid args",
    )
    c.register_system_shared_memory("r", region, 64)
    assert refused(lambda: c.register_system_shared_memory("r", region, 64)) == (
        expect(transport, "ALREADY_EXISTS"),
        "shared memory region 'r' already in manager",
    )
    assert refused(lambda: c.get_cuda_shared_memory_status("r")) == (
        expect(transport, "NOT_FOUND"),
        "The region named 'r' is registered as system shared memory, not CUDA shared memory",
    )
    mod = httpclient if transport == "http" else grpcclient

    def shm_inputs(name: str, size: int, offset: int = 0) -> list[Any]:
        x = mod.InferInput("INPUT0", [4], "FP32")
        x.set_shared_memory(name, size, offset=offset)
        return [x, tensor(transport, "INPUT1", [4], "FP32")]

    assert refused(lambda: c.infer("add_sub", shm_inputs("nope", 16))) == (
        expect(transport, "NOT_FOUND"),
        "Unable to find shared memory region: 'nope'",
    )
    assert refused(lambda: c.infer("add_sub", shm_inputs("r", 16, offset=64))) == (
        expect(transport, "INVALID_ARGUMENT"),
        "Invalid offset for shared memory region: 'r'",
    )
    assert refused(lambda: c.infer("add_sub", shm_inputs("r", 16, offset=56))) == (
        expect(transport, "INVALID_ARGUMENT"),
        "Invalid offset + byte size for shared memory region: 'r'",
    )
    out = mod.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("r", 8)
    # Triton's code is INTERNAL here; a client's mistake is a 400 in Shoal
    assert refused(lambda: c.infer("add_sub", add_sub_inputs(transport), outputs=[out])) == (
        expect(transport, "INVALID_ARGUMENT"),
        "shared memory size specified with the request for output 'OUTPUT0' (8 bytes) should be at least 16 bytes "
        "to hold the results",
    )


# ---- what only one transport can carry -----------------------------------------------------------


def _grpc_refused(srv: ServerProcess, request: service_pb2.ModelInferRequest) -> tuple[str, str]:
    with grpc.insecure_channel(srv.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
    return err.value.code().name, err.value.details() or ""


def _simple_request(**input1: Any) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="simple_onnx")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    one = req.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    for field, values in input1.items():
        getattr(one.contents, field).extend(values)
    return req


def test_grpc_raw_and_typed_contents(srv: ServerProcess) -> None:
    mixed = _simple_request(int_contents=[0] * 16)
    mixed.raw_input_contents.append(bytes(64))
    assert _grpc_refused(srv, mixed) == (
        "INVALID_ARGUMENT",
        "contents field must not be specified when using raw_input_contents for 'INPUT1' for model 'simple_onnx'",
    )
    missing = _simple_request()
    missing.raw_input_contents.append(bytes(64))
    assert _grpc_refused(srv, missing) == (
        "INVALID_ARGUMENT",
        "unable to find data for input tensor 'INPUT1' for model 'simple_onnx' in request.",
    )
    typed = service_pb2.ModelInferRequest(model_name="simple_onnx")
    typed.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16]).contents.fp32_contents.extend([0.0] * 16)
    assert _grpc_refused(srv, typed) == (
        "INVALID_ARGUMENT",
        "unexpected explicit tensor data for input tensor 'INPUT0' for model 'simple_onnx' of type 'FP32', expected "
        "datatype 'INT32'",
    )
    twice = service_pb2.ModelInferRequest(model_name="simple_onnx")
    both = twice.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16]).contents
    both.int_contents.extend([0] * 16)
    both.fp32_contents.extend([0.0] * 16)
    assert _grpc_refused(srv, twice) == (
        "INVALID_ARGUMENT",
        "unexpected explicit tensor data for input tensor 'INPUT0' for model 'simple_onnx', binary data was already "
        "supplied.",
    )
    with_shm = service_pb2.ModelInferRequest(model_name="simple_onnx")
    t = with_shm.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = 64
    t.contents.int_contents.extend([0] * 16)
    assert _grpc_refused(srv, with_shm) == (
        "INVALID_ARGUMENT",
        "unexpected 'content' provided when using shared memory for input tensor 'INPUT0' for model 'simple_onnx'",
    )
    unknown = service_pb2.ModelInferRequest(model_name="simple_onnx", raw_input_contents=[bytes(64), bytes(64)])
    unknown.inputs.add(name="INPUT0", datatype="FLOAT", shape=[1, 16])
    unknown.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    assert _grpc_refused(srv, unknown) == (
        "INVALID_ARGUMENT",
        f"{ID}inference input 'INPUT0' data-type is '<invalid>', but model 'simple_onnx' expects 'INT32'",
    )


def _http_refused(srv: ServerProcess, model: str, body: bytes, header_length: int | None = None) -> tuple[str, str]:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return str(resp.status), json.loads(data)["error"]


def _json(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


INPUT1 = {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}


def test_http_body_errors(srv: ServerProcess) -> None:
    fields = "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
    fields += "'shared_memory_region' in 'parameters'. But"
    assert _http_refused(srv, "add_sub", _json({"name": "INPUT0", "datatype": "FP32", "shape": [4]}, INPUT1)) == (
        "400",
        fields + " no field is set",
    )
    both = {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}
    both["parameters"] = {"binary_data_size": 16}
    assert _http_refused(srv, "add_sub", _json(both, INPUT1)) == ("400", fields + " set 'data' 'binary_data_size'")
    binary = {"name": "INPUT0", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}
    head = _json(binary, INPUT1)
    assert _http_refused(srv, "add_sub", head + bytes(10), len(head)) == (
        "400",
        "unexpected size for input 'INPUT0', expecting 6 additional bytes for model 'add_sub'",
    )
    assert _http_refused(srv, "add_sub", head + bytes(20), len(head)) == (
        "400",
        "unexpected additional input data for model 'add_sub'",
    )
    # Triton's JSON reader answers these with INTERNAL (500); a client's mistake is a 400 here
    many = {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4, 5]}
    assert _http_refused(srv, "add_sub", _json(many, INPUT1)) == (
        "400",
        "Unable to parse 'data': Shape does not match true shape of 'data' field",
    )
    few = {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3]}
    assert _http_refused(srv, "add_sub", _json(few, INPUT1)) == (
        "400",
        "Failed to parse 'data' field: shape does not match true shape",
    )
    negative = {"name": "INPUT0", "datatype": "FP32", "shape": [-4], "data": [1, 2, 3, 4]}
    assert _http_refused(srv, "add_sub", _json(negative, INPUT1)) == (
        "400",
        "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer",
    )
    unknown = {"name": "INPUT0", "datatype": "FLOAT", "shape": [4], "data": [1, 2, 3, 4]}
    assert _http_refused(srv, "add_sub", _json(unknown, INPUT1)) == ("400", "invalid datatype for input INPUT0")
    half = {"name": "INPUT0", "datatype": "FP16", "shape": [4], "data": [1, 2, 3, 4]}
    assert _http_refused(srv, "add_sub", _json(half, INPUT1)) == (
        "400",
        "receiving FP16 data via JSON is not supported. Please use the binary data format for input INPUT0",
    )
    reserved = json.dumps({"inputs": [INPUT1], "parameters": {"triton_x": 1}}).encode()
    assert _http_refused(srv, "add_sub", reserved) == (
        "400",
        "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified.",
    )
    # a raw body (header length 0) feeds a model's one input
    assert _http_refused(srv, "add_sub", bytes(16), 0) == (
        "400",
        f"{ID}Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in 'add_sub' model "
        "configuration",
    )
