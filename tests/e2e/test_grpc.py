"""The gRPC frontend through the real server with tritonclient.grpc (sync, async_infer,
streaming, asyncio) and with the generated stubs for what tritonclient never sends."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import grpc_service_pb2_grpc as pb_grpc
from shoal.proto.gen import health_pb2, health_pb2_grpc
from tests.e2e.server import ServerProcess
from tests.e2e.test_http_datatypes import SAMPLES


@pytest.fixture
def client(server: ServerProcess) -> Any:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(server: ServerProcess) -> Any:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def add_sub_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    i0 = grpcclient.InferInput("INPUT0", list(a.shape), "FP32")
    i0.set_data_from_numpy(a)
    i1 = grpcclient.InferInput("INPUT1", list(b.shape), "FP32")
    i1.set_data_from_numpy(b)
    return [i0, i1]


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "shoal" and "logging" in meta["extensions"]
    assert client.is_model_ready("add_sub")
    m = client.get_model_metadata("simple_onnx", as_json=True)
    assert m["platform"] == "onnxruntime_onnx"
    assert m["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": ["-1", "16"]}
    cfg = client.get_model_config("simple_onnx", as_json=True)["config"]
    assert cfg["name"] == "simple_onnx" and cfg["max_batch_size"] == 8


def test_model_ready_is_false_for_unknown_models_and_versions(client: Any) -> None:
    """As Triton: ready false with an OK status (tritonclient's is_model_ready returns False)."""
    assert client.is_model_ready("nope") is False
    assert client.is_model_ready("add_sub", "9") is False
    assert client.is_model_ready("add_sub", "1") is True
    with pytest.raises(InferenceServerException) as info:  # not a version at all
        client.is_model_ready("add_sub", "x")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_standard_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_infer(client: Any) -> None:
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 3.0, dtype=np.float32)
    r = client.infer("add_sub", add_sub_inputs(a, b), request_id="abc")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    resp = r.get_response()
    assert resp.id == "abc" and resp.model_version == "1"
    assert len(resp.raw_output_contents) == len(resp.outputs) == 2
    r = client.infer("add_sub", add_sub_inputs(a, b), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in r.get_response().outputs] == ["OUTPUT1"]


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype(client: Any, datatype: str) -> None:
    data = SAMPLES[datatype]
    i = grpcclient.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    i.set_data_from_numpy(data)
    r = client.infer("echo_all", [i], outputs=[grpcclient.InferRequestedOutput(f"OUT_{datatype}")])
    np.testing.assert_array_equal(r.as_numpy(f"OUT_{datatype}"), data)


def test_typed_contents(stub: Any) -> None:
    req = pb.ModelInferRequest(model_name="echo_all")
    for dt, field, values in (
        ("INT8", "int_contents", [-3, 0, 5]),
        ("UINT64", "uint64_contents", [2**64 - 1]),
        ("BOOL", "bool_contents", [True, False]),
        ("BYTES", "bytes_contents", [b"x", b"yz"]),
        ("FP64", "fp64_contents", [0.5]),
    ):
        t = req.inputs.add(name=f"IN_{dt}", datatype=dt, shape=[len(values)])
        getattr(t.contents, field).extend(values)
        req.outputs.add(name=f"OUT_{dt}")
    resp = stub.ModelInfer(req)
    raw = dict(zip([o.name for o in resp.outputs], resp.raw_output_contents, strict=True))
    assert np.frombuffer(raw["OUT_INT8"], np.int8).tolist() == [-3, 0, 5]
    assert np.frombuffer(raw["OUT_UINT64"], np.uint64).tolist() == [2**64 - 1]
    assert np.frombuffer(raw["OUT_BOOL"], np.bool_).tolist() == [True, False]
    assert raw["OUT_BYTES"] == b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"


def test_bad_requests(stub: Any) -> None:
    def code(req: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req)
        return info.value.code(), info.value.details()

    # contents out of range, contents mixed with raw, too few and too many raw entries
    req = pb.ModelInferRequest(model_name="echo_all")
    req.inputs.add(name="IN_INT8", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    assert code(req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    req.raw_input_contents.append(b"\x01")
    c, msg = code(req)
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in msg
    req = pb.ModelInferRequest(model_name="echo_all")
    req.inputs.add(name="IN_INT8", datatype="INT8", shape=[1])
    c, msg = code(req)
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "unable to find data for input tensor 'IN_INT8'" in msg
    req.raw_input_contents.extend([b"\x01", b"\x02"])
    assert code(req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # wrong dtype / shape / name / unknown model / reserved parameter / bad version
    for name, dt, shape in (("IN_INT8", "INT16", [1]), ("IN_INT8", "INT8", [2]), ("IN_NOPE", "INT8", [1])):
        req = pb.ModelInferRequest(model_name="echo_all", raw_input_contents=[b"\x01"])
        req.inputs.add(name=name, datatype=dt, shape=shape)
        c, msg = code(req)
        assert c == grpc.StatusCode.INVALID_ARGUMENT and name in msg, msg
    req = pb.ModelInferRequest(model_name="nope")
    assert code(req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.ModelInferRequest(model_name="echo_all", model_version="x1")
    assert code(req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.ModelInferRequest(model_name="echo_all")
    req.parameters["triton_secret"].bool_param = True
    assert code(req)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_trace_settings_default_to_off(client: Any) -> None:
    """Tracing is off unless --trace-config turns it on (tests/e2e/test_trace.py has the rest)."""
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"] == {"value": ["OFF"]}
    assert settings["trace_mode"] == {"value": ["triton"]}


def test_log_settings(client: Any, server: ServerProcess) -> None:
    before = client.get_log_settings(as_json=True)["settings"]
    assert before["log_verbose_level"] == {"uint32_param": 0}
    after = client.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert after["log_verbose_level"] == {"uint32_param": 1}
    client.update_log_settings({"log_verbose_level": 0})
    with pytest.raises(InferenceServerException):
        client.update_log_settings({"log_file": "/tmp/elsewhere.log"})
    http = server.client()
    assert http.get_log_settings()["log_verbose_level"] == 0
    assert http.update_log_settings({"log_info": True})["log_info"] is True


def test_async_infer_and_compression(client: Any) -> None:
    a = np.arange(4, dtype=np.float32)
    results: queue.Queue[Any] = queue.Queue()
    for _ in range(8):
        client.async_infer("add_sub", add_sub_inputs(a, a), callback=lambda result, error: results.put((result, error)))
    for _ in range(8):
        result, error = results.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
    r = client.infer("add_sub", add_sub_inputs(a, a), compression_algorithm="gzip")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), np.zeros(4, np.float32))


def test_messages_larger_than_4_mib(client: Any) -> None:
    data = np.random.default_rng(1).random(3 << 20, dtype=np.float32)  # 12 MiB
    i = grpcclient.InferInput("INPUT0", [data.size], "FP32")
    i.set_data_from_numpy(data)
    r = client.infer("identity_fp32", [i])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)


def test_stream_carries_a_failure_between_successes(client: Any) -> None:
    a = np.arange(4, dtype=np.float32)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("add_sub", add_sub_inputs(a, a), request_id="1")
        client.async_stream_infer("add_sub", add_sub_inputs(a, a)[:1], request_id="2")
        client.async_stream_infer("no_such_model", add_sub_inputs(a, a), request_id="3")
        client.async_stream_infer("add_sub", add_sub_inputs(a, a), request_id="4")
        outcomes = [got.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    ok = sorted(r.get_response().id for r, e in outcomes if e is None)
    errors = [str(e) for _, e in outcomes if e is not None]
    assert ok == ["1", "4"]
    assert len(errors) == 2
    assert any("INPUT1" in e for e in errors) and any("no_such_model" in e for e in errors)


def test_stream_many_requests_out_of_order(client: Any) -> None:
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for k in range(40):
            i = grpcclient.InferInput("INPUT0", [4], "FP32")
            i.set_data_from_numpy(np.full(4, k, dtype=np.float32))
            client.async_stream_infer("slow", [i], request_id=str(k), parameters={"delay_ms": (k % 3) * 5})
        outcomes = [got.get(timeout=60) for _ in range(40)]
    finally:
        client.stop_stream()
    for result, error in outcomes:
        assert error is None
        k = int(result.get_response().id)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full(4, k, dtype=np.float32))


def test_client_disconnects_mid_stream(server: ServerProcess) -> None:
    """A client that vanishes with requests in flight leaves the router serving."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: None)
    for _ in range(4):
        i = grpcclient.InferInput("INPUT0", [4], "FP32")
        i.set_data_from_numpy(np.ones(4, np.float32))
        c.async_stream_infer("slow", [i], parameters={"delay_ms": 300})
    time.sleep(0.1)
    c.close()  # tears the channel down under the open stream
    time.sleep(1.0)
    c2 = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        a = np.ones(4, dtype=np.float32)
        assert c2.is_server_ready()
        np.testing.assert_array_equal(c2.infer("add_sub", add_sub_inputs(a, a)).as_numpy("OUTPUT0"), a * 2)
    finally:
        c2.close()


def test_asyncio_client(server: ServerProcess) -> None:
    async def go() -> None:
        async with grpcaio.InferenceServerClient(server.grpc_url) as c:
            assert await c.is_server_live()
            a = np.arange(4, dtype=np.float32)
            inputs = []
            for n in ("INPUT0", "INPUT1"):
                i = grpcaio.InferInput(n, [4], "FP32")
                i.set_data_from_numpy(a)
                inputs.append(i)
            results = await asyncio.gather(*(c.infer("add_sub", inputs) for _ in range(32)))
            for r in results:
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 2)

            async def requests() -> Any:
                for k in range(3):
                    yield {"model_name": "add_sub", "inputs": inputs, "request_id": str(k)}

            seen = []
            async for result, error in c.stream_infer(requests()):
                assert error is None
                seen.append(result.get_response().id)
            assert sorted(seen) == ["0", "1", "2"]

    asyncio.run(go())


def test_concurrent_clients_in_threads(server: ServerProcess) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for _ in range(10):
                a = np.full(4, k, dtype=np.float32)
                np.testing.assert_array_equal(c.infer("add_sub", add_sub_inputs(a, a)).as_numpy("OUTPUT0"), a * 2)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_worker_crash_is_unavailable(client: Any) -> None:
    i = grpcclient.InferInput("INPUT0", [1], "INT32")
    i.set_data_from_numpy(np.array([1], dtype=np.int32))  # crashy SIGKILLs itself
    with pytest.raises(InferenceServerException) as info:
        client.infer("crashy", [i])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "SIGKILL" in str(info.value)
