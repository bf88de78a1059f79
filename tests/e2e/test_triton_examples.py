"""Conformance with Triton's own examples: the models of Triton's example model repository
(built by scripts/make_triton_examples.py to Triton's configurations) served by the real
server, and client code doing what Triton's Python client examples do
(triton-inference-server/client src/python/examples), checking what they check.

Covered: health and metadata (server name "triton" through ``--id``), sync, async and
asyncio inference over HTTP and gRPC (JSON and binary tensors, compression), strings and the
Python identity model (NUL bytes, ``np.bytes_`` arrays), INT8, explicit ``contents`` versus
``raw_input_contents`` over gRPC, system shared memory (INT32 and BYTES), sequences (sync,
stream and asyncio stream; integer and string correlation ids; the "dyna" models whose END
request adds the correlation id), the decoupled ``repeat_int32`` over a gRPC stream, and model
control in explicit mode (repository index, load with a configuration override, unload).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import queue
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import tritonclient.utils.shared_memory as shm
from tritonclient import utils
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ROOT, ServerProcess

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(180)

KEY_PREFIX = f"/triton_examples_{os.getpid()}_"

SEQUENCE_VALUES = [11, 7, 5, 3, 2, 0, 1]


def _script() -> ModuleType:
    name = "shoal_make_triton_examples"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_triton_examples.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton_examples")
    written = _script().make_triton_examples(repo)
    assert repo / "simple" / "1" / "model.onnx" in written
    return repo


def _serve(repo: Path, *args: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(repo, "--id", "triton", *args).start()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), srv.segments()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Every example model loaded, as ``tritonserver --model-repository`` would."""
    yield from _serve(_repository(tmp_path_factory))


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same repository in explicit model-control mode, nothing loaded at start."""
    yield from _serve(_repository(tmp_path_factory), "--model-control-mode=explicit")


def _http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return server.client()


def _grpc(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


X = np.arange(16, dtype=np.int32).reshape(1, 16)
ONES = np.ones((1, 16), dtype=np.int32)


def _check_add_sub(out0: Any, out1: Any, a: np.ndarray, b: np.ndarray) -> None:
    assert np.asarray(out0).tolist() == (a + b).tolist()
    assert np.asarray(out1).tolist() == (a - b).tolist()


# ---- health and metadata -------------------------------------------------------------------


def test_health_and_metadata_http(server: ServerProcess) -> None:
    c = _http(server)
    assert c.is_server_live(query_params={"test_1": 1, "test_2": 2})
    assert c.is_server_ready()
    assert c.is_model_ready("simple")
    meta = c.get_server_metadata()
    assert meta["name"] == "triton"
    assert "sequence" in meta["extensions"] and "system_shared_memory" in meta["extensions"]
    model = c.get_model_metadata("simple", query_params={"test_1": 1, "test_2": 2})
    assert model["name"] == "simple"
    assert model["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    with pytest.raises(InferenceServerException) as err:
        c.get_model_metadata("wrong_model_name")
    assert "Request for unknown model" in err.value.message()


def test_health_and_metadata_grpc(server: ServerProcess) -> None:
    with _grpc(server) as c:
        assert c.is_server_live(headers={"test": "1", "dummy": "2"})
        assert c.is_server_ready()
        assert c.is_model_ready("simple")
        assert c.get_server_metadata().name == "triton"
        model = c.get_model_metadata("simple", headers={"test": "1", "dummy": "2"})
        assert model.name == "simple"
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("OUTPUT0", "INT32", [-1, 16]),
            ("OUTPUT1", "INT32", [-1, 16]),
        ]
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("wrong_model_name")
        assert "Request for unknown model" in err.value.message()
        config = c.get_model_config("simple").config
        assert config.name == "simple"
        assert config.max_batch_size == 8


# ---- simple: sync, async and asyncio inference ----------------------------------------------


def _http_inputs(mod: Any, a: np.ndarray, b: np.ndarray) -> list[Any]:
    i0 = mod.InferInput("INPUT0", [1, 16], "INT32")
    i0.set_data_from_numpy(a, binary_data=False)  # JSON
    i1 = mod.InferInput("INPUT1", [1, 16], "INT32")
    i1.set_data_from_numpy(b, binary_data=True)
    return [i0, i1]


def _http_outputs(mod: Any) -> list[Any]:
    return [
        mod.InferRequestedOutput("OUTPUT0", binary_data=True),
        mod.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]


@pytest.mark.parametrize("compression", [(None, None), ("gzip", "deflate"), ("deflate", "gzip")])
def test_simple_http_infer(server: ServerProcess, compression: tuple[str | None, str | None]) -> None:
    c = _http(server)
    minus = np.full((1, 16), -1, dtype=np.int32)
    kw: dict[str, Any] = {
        "query_params": {"test_1": 1, "test_2": 2},
        "headers": {"X-Example": "1"},
        "request_compression_algorithm": compression[0],
        "response_compression_algorithm": compression[1],
    }
    result = c.infer("simple", _http_inputs(httpclient, X, minus), outputs=_http_outputs(httpclient), **kw)
    _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, minus)
    stats = c.get_inference_statistics(model_name="simple")
    assert [s["name"] for s in stats["model_stats"]] == ["simple"]
    assert stats["model_stats"][0]["inference_count"] >= 1
    result = c.infer("simple", _http_inputs(httpclient, X, minus), outputs=None, **kw)  # every output
    _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, minus)
    with pytest.raises(InferenceServerException) as err:
        c.infer("wrong_model_name", _http_inputs(httpclient, X, minus), outputs=_http_outputs(httpclient))
    assert err.value.message().startswith("Request for unknown model")


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_simple_grpc_infer(server: ServerProcess, compression: str | None) -> None:
    with _grpc(server) as c:
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(X)
        inputs[1].set_data_from_numpy(ONES)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        result = c.infer(
            "simple",
            inputs,
            outputs=outputs,
            client_timeout=30.0,
            headers={"test": "1"},
            compression_algorithm=compression,
        )
        _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, ONES)
        assert len(c.get_inference_statistics(model_name="simple").model_stats) == 1
        result = c.infer("simple", inputs, outputs=None, compression_algorithm=compression)
        _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, ONES)


def test_simple_http_async_infer(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.url, concurrency=2)
    try:
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(X, binary_data=True)
        inputs[1].set_data_from_numpy(ONES, binary_data=True)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("OUTPUT0", "OUTPUT1")]
        pending = [c.async_infer("simple", inputs, outputs=outputs) for _ in range(2)]
        for p in pending:
            result = p.get_result()
            _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, ONES)
    finally:
        c.close()


def test_simple_grpc_async_infer(server: ServerProcess) -> None:
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with _grpc(server) as c:
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(X)
        inputs[1].set_data_from_numpy(ONES)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        c.async_infer(
            "simple",
            inputs,
            callback=lambda result, error: done.put((result, error)),
            outputs=outputs,
            client_timeout=30.0,
        )
        result, error = done.get(timeout=30)
        assert error is None
        _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, ONES)


def test_simple_http_aio_infer(server: ServerProcess) -> None:
    minus = np.full((1, 16), -1, dtype=np.int32)

    async def main() -> None:
        c = httpaio.InferenceServerClient(server.url)
        try:

            async def infer(model: str, with_outputs: bool) -> Any:
                return await c.infer(
                    model,
                    _http_inputs(httpaio, X, minus),
                    outputs=_http_outputs(httpaio) if with_outputs else None,
                    query_params={"test_1": 1, "test_2": 2},
                )

            result = await infer("simple", True)
            _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, minus)
            stats = await c.get_inference_statistics(model_name="simple")
            assert len(stats["model_stats"]) == 1
            result = await infer("simple", False)
            _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, minus)
            with pytest.raises(InferenceServerException) as err:
                await infer("wrong_model_name", True)
            assert err.value.message().startswith("Request for unknown model")
            both = await asyncio.gather(infer("simple", True), infer("simple", False))
            for r in both:
                _check_add_sub(r.as_numpy("OUTPUT0"), r.as_numpy("OUTPUT1"), X, minus)
        finally:
            await c.close()

    asyncio.run(main())


def test_simple_grpc_aio_infer(server: ServerProcess) -> None:
    async def main() -> None:
        async with grpcaio.InferenceServerClient(server.grpc_url) as c:
            inputs = [grpcaio.InferInput("INPUT0", [1, 16], "INT32"), grpcaio.InferInput("INPUT1", [1, 16], "INT32")]
            inputs[0].set_data_from_numpy(X)
            inputs[1].set_data_from_numpy(ONES)
            outputs = [grpcaio.InferRequestedOutput("OUTPUT0"), grpcaio.InferRequestedOutput("OUTPUT1")]
            result = await c.infer("simple", inputs, outputs=outputs, client_timeout=30.0, headers={"test": "1"})
            _check_add_sub(result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1"), X, ONES)
            stats = await c.get_inference_statistics(model_name="simple")
            assert len(stats.model_stats) == 1
            both = await asyncio.gather(
                c.infer("simple", inputs, outputs=None), c.infer("simple", inputs, outputs=None)
            )
            for r in both:
                _check_add_sub(r.as_numpy("OUTPUT0"), r.as_numpy("OUTPUT1"), X, ONES)

    asyncio.run(main())


# ---- strings, identity and INT8 -------------------------------------------------------------


def _as_strings(a: np.ndarray) -> np.ndarray:
    return np.array([str(v).encode() for v in a.reshape(-1)], dtype=np.object_).reshape(a.shape)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_simple_string(server: ServerProcess, proto: str) -> None:
    a, b = _as_strings(X), _as_strings(ONES)
    if proto == "http":
        c: Any = _http(server)
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_data_from_numpy(a, binary_data=True)
        inputs[1].set_data_from_numpy(b, binary_data=False)
        outputs: list[Any] = _http_outputs(httpclient)
    else:
        c = _grpc(server)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "BYTES"), grpcclient.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = c.infer("simple_string", inputs, outputs=outputs)
    sums = [int(v) for v in result.as_numpy("OUTPUT0").reshape(-1)]
    diffs = [int(v) for v in result.as_numpy("OUTPUT1").reshape(-1)]
    assert sums == list(range(1, 17))
    assert diffs == list(range(-1, 15))
    assert result.as_numpy("OUTPUT0")[0][3] == b"4"  # numbers come back as decimal strings
    if proto == "grpc":
        c.close()


@pytest.mark.parametrize(
    ("proto", "binary"), [("http", True), ("http", False), ("grpc", True)], ids=["http-binary", "http-json", "grpc"]
)
@pytest.mark.parametrize("kind", ["nul_chars", "np_bytes"])
def test_simple_identity(server: ServerProcess, proto: str, binary: bool, kind: str) -> None:
    if kind == "nul_chars":
        data = np.array([b"he\x00llo"] * 16, dtype=np.object_).reshape(1, 16)
    else:
        data = np.array([b"\x00\x01\x02\x03"] * 16, dtype=np.bytes_).reshape(1, 16)
    if proto == "http":
        c: Any = _http(server)
        i = httpclient.InferInput("INPUT0", list(data.shape), "BYTES")
        i.set_data_from_numpy(data, binary_data=binary)
        o: Any = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    else:
        c = _grpc(server)
        i = grpcclient.InferInput("INPUT0", list(data.shape), "BYTES")
        i.set_data_from_numpy(data)
        o = grpcclient.InferRequestedOutput("OUTPUT0")
    out = c.infer("simple_identity", [i], outputs=[o]).as_numpy("OUTPUT0")
    assert out.shape == (1, 16)
    if data.dtype == np.object_ and not binary:  # JSON strings come back as str
        assert [v.encode() if isinstance(v, str) else v for v in out.reshape(-1)] == list(data.reshape(-1))
    elif data.dtype == np.object_:
        assert np.array_equal(out, data)
    else:
        assert np.array_equal(np.char.encode(out.astype(str)), data)
    if proto == "grpc":
        c.close()


def _raw_stub(server: ServerProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _explicit_request(model: str, datatype: str, in0: list[Any], in1: list[Any]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, model_version="")
    for name, values in (("INPUT0", in0), ("INPUT1", in1)):
        t = request.inputs.add(name=name, datatype=datatype, shape=[1, 16])
        if datatype == "BYTES":
            t.contents.bytes_contents.extend(values)
        else:
            t.contents.int_contents[:] = values
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT1")
    return request


@pytest.mark.parametrize(
    ("model", "datatype", "dtype"), [("simple", "INT32", np.int32), ("simple_int8", "INT8", np.int8)]
)
def test_explicit_int_contents(server: ServerProcess, model: str, datatype: str, dtype: Any) -> None:
    """Inputs in ``contents.int_contents``; outputs come back in ``raw_output_contents``."""
    channel, stub = _raw_stub(server)
    with channel:
        in0, in1 = list(range(16)), [1] * 16
        response = stub.ModelInfer(_explicit_request(model, datatype, in0, in1))
        assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
        results = [
            np.frombuffer(raw, dtype=dtype).reshape(list(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        ]
        assert results[0].tolist() == [[a + b for a, b in zip(in0, in1, strict=True)]]
        assert results[1].tolist() == [[a - b for a, b in zip(in0, in1, strict=True)]]


def test_explicit_byte_contents(server: ServerProcess) -> None:
    channel, stub = _raw_stub(server)
    with channel:
        request = _explicit_request("simple_string", "BYTES", [str(i).encode() for i in range(16)], [b"1"] * 16)
        response = stub.ModelInfer(request)
        results = [
            np.resize(utils.deserialize_bytes_tensor(raw), list(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        ]
        assert [int(v) for v in results[0][0]] == [i + 1 for i in range(16)]
        assert [int(v) for v in results[1][0]] == [i - 1 for i in range(16)]


def _refused(server: ServerProcess, request: Any) -> grpc.RpcError:
    channel, stub = _raw_stub(server)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert isinstance(err.value, grpc.RpcError)
    return err.value


def _contents_and_raw() -> Any:
    """INPUT0 half in ``raw_input_contents``, half in ``contents``."""
    request = _explicit_request("simple", "INT32", list(range(16)), [1] * 16)
    request.raw_input_contents.extend([np.arange(8, dtype=np.int32).tobytes()])
    request.inputs[0].contents.int_contents[:] = list(range(8, 16))
    return request


def _wrong_version() -> Any:
    request = _explicit_request("simple_int8", "INT8", list(range(16)), [1] * 16)
    request.model_version = "wrong_specification"
    return request


def test_explicit_contents_with_raw_contents_is_refused(server: ServerProcess) -> None:
    err = _refused(server, _contents_and_raw())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
    assert text in err.details()


def test_wrong_model_version_string_is_refused(server: ServerProcess) -> None:
    err = _refused(server, _wrong_version())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed to get model version from specified version string 'wrong_specification'" in err.details()


# ---- system shared memory -------------------------------------------------------------------


class _Regions:
    """Client regions of one test, destroyed at its end (the server forgets them first)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.handles: list[Any] = []

    def create(self, name: str, nbytes: int) -> tuple[Any, str]:
        key = f"{KEY_PREFIX}{name}"
        handle = shm.create_shared_memory_region(name, key, nbytes)
        self.handles.append(handle)
        return handle, key

    def close(self) -> None:
        c = httpclient.InferenceServerClient(self.server.url)
        try:
            c.unregister_system_shared_memory()
        finally:
            c.close()
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions(server: ServerProcess) -> Iterator[_Regions]:
    r = _Regions(server)
    yield r
    r.close()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_simple_shm(server: ServerProcess, regions: _Regions, proto: str) -> None:
    mod: Any = httpclient if proto == "http" else grpcclient
    c: Any = _http(server) if proto == "http" else _grpc(server)
    c.unregister_system_shared_memory()
    c.unregister_cuda_shared_memory()
    a, b = np.arange(16, dtype=np.int32), np.ones(16, dtype=np.int32)
    size = a.nbytes
    out_handle, out_key = regions.create(f"output_data_{proto}", size * 2)
    in_handle, in_key = regions.create(f"input_data_{proto}", size * 2)
    shm.set_shared_memory_region(in_handle, [a])
    shm.set_shared_memory_region(in_handle, [b], offset=size)
    c.register_system_shared_memory(f"output_data_{proto}", out_key, size * 2)
    c.register_system_shared_memory(f"input_data_{proto}", in_key, size * 2)
    inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory(f"input_data_{proto}", size)
    inputs[1].set_shared_memory(f"input_data_{proto}", size, offset=size)
    kw = {"binary_data": True} if proto == "http" else {}
    outputs = [mod.InferRequestedOutput("OUTPUT0", **kw), mod.InferRequestedOutput("OUTPUT1", **kw)]
    outputs[0].set_shared_memory(f"output_data_{proto}", size)
    outputs[1].set_shared_memory(f"output_data_{proto}", size, offset=size)
    result = c.infer("simple", inputs, outputs=outputs)
    got = []
    for offset, name in ((0, "OUTPUT0"), (size, "OUTPUT1")):
        meta = result.get_output(name)
        assert meta is not None
        datatype = meta["datatype"] if proto == "http" else meta.datatype
        shape = meta["shape"] if proto == "http" else list(meta.shape)
        assert (datatype, list(shape)) == ("INT32", [1, 16])
        got.append(shm.get_contents_as_numpy(out_handle, utils.triton_to_np_dtype(datatype), shape, offset=offset))
    _check_add_sub(got[0], got[1], a[None], b[None])
    status = c.get_system_shared_memory_status()
    names = [r["name"] for r in status] if proto == "http" else list(status.regions)
    assert sorted(names) == sorted([f"input_data_{proto}", f"output_data_{proto}"])
    c.unregister_system_shared_memory()
    status = c.get_system_shared_memory_status()
    assert (len(status) if proto == "http" else len(status.regions)) == 0
    if proto == "grpc":
        c.close()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_simple_string_shm(server: ServerProcess, regions: _Regions, proto: str) -> None:
    mod: Any = httpclient if proto == "http" else grpcclient
    c: Any = _http(server) if proto == "http" else _grpc(server)
    c.unregister_system_shared_memory()
    a, b = np.arange(16), np.ones(16, dtype=np.int64)
    tensors = {
        "input0": _as_strings(a),
        "input1": _as_strings(b),
        "output0": _as_strings(a + b),
        "output1": _as_strings(a - b),
    }
    handles = {}
    sizes = {}
    for name, values in tensors.items():
        serialized = utils.serialize_byte_tensor(values)
        sizes[name] = utils.serialized_byte_size(serialized)
        region = f"{name}_data_{proto}"
        handles[name], key = regions.create(region, sizes[name])
        if name.startswith("input"):
            shm.set_shared_memory_region(handles[name], [serialized])
        c.register_system_shared_memory(region, key, sizes[name])
    inputs = [mod.InferInput("INPUT0", [1, 16], "BYTES"), mod.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_shared_memory(f"input0_data_{proto}", sizes["input0"])
    inputs[1].set_shared_memory(f"input1_data_{proto}", sizes["input1"])
    kw = {"binary_data": True} if proto == "http" else {}
    outputs = [mod.InferRequestedOutput("OUTPUT0", **kw), mod.InferRequestedOutput("OUTPUT1", **kw)]
    outputs[0].set_shared_memory(f"output0_data_{proto}", sizes["output0"])
    outputs[1].set_shared_memory(f"output1_data_{proto}", sizes["output1"])
    result = c.infer("simple_string", inputs, outputs=outputs)
    for name, key in (("OUTPUT0", "output0"), ("OUTPUT1", "output1")):
        meta = result.get_output(name)
        assert meta is not None
        datatype = meta["datatype"] if proto == "http" else meta.datatype
        shape = meta["shape"] if proto == "http" else list(meta.shape)
        got = shm.get_contents_as_numpy(handles[key], utils.triton_to_np_dtype(datatype), shape)
        assert got.reshape(-1).tolist() == tensors[key].reshape(-1).tolist()
    c.unregister_system_shared_memory()
    if proto == "grpc":
        c.close()


# ---- sequences --------------------------------------------------------------------------------


def _sequences(dyna: bool) -> list[tuple[str, int | str, list[int]]]:
    """The three sequences of Triton's sequence examples: (model, correlation id, inputs)."""
    negated = [-v for v in SEQUENCE_VALUES]
    int_model = "simple_dyna_sequence" if dyna else "simple_sequence"
    # the dyna string model needs an id holding a number; the other takes any string
    string_model, string_id = "simple_string_dyna_sequence", "1002"
    if not dyna:
        string_model, string_id = "simple_sequence", str(uuid.uuid4())
    return [
        (int_model, 1000, [0, *SEQUENCE_VALUES]),
        (int_model, 1001, [100, *negated]),
        (string_model, string_id, [20, *negated]),
    ]


def _expected(model: str, corrid: int | str, values: list[int]) -> list[int]:
    """What each model answers: simple_sequence adds START, simple_dyna_sequence also adds the
    correlation id on the END request; simple_string_dyna_sequence answers the running sum,
    plus the correlation id (a number in a string) on the END request."""
    out, total = [], 0
    for k, v in enumerate(values):
        start, end = k == 0, k == len(values) - 1
        if model == "simple_string_dyna_sequence":
            total += v
            out.append(total + (int(corrid) if end else 0))
        else:
            add_id = int(corrid) if end and model == "simple_dyna_sequence" else 0
            out.append(v + int(start) + add_id)
    return out


def _seq_input(mod: Any, value: int) -> list[Any]:
    i = mod.InferInput("INPUT", [1, 1], "INT32")
    i.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
    return [i]


@pytest.mark.parametrize("dyna", [False, True], ids=["sequence", "dyna"])
@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_sequence_sync(server: ServerProcess, proto: str, dyna: bool) -> None:
    mod: Any = httpclient if proto == "http" else grpcclient
    c: Any = _http(server) if proto == "http" else _grpc(server)
    for model, corrid, values in _sequences(dyna):
        got = []
        for k, v in enumerate(values):
            result = c.infer(
                model,
                _seq_input(mod, v),
                outputs=[mod.InferRequestedOutput("OUTPUT")],
                sequence_id=corrid,
                sequence_start=k == 0,
                sequence_end=k == len(values) - 1,
            )
            out = result.as_numpy("OUTPUT")
            assert out.shape == (1, 1)
            got.append(int(out[0][0]))
        assert got == _expected(model, corrid, values), (model, corrid)
    if proto == "grpc":
        c.close()


def _by_sequence(responses: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Responses with ids ``<corrid>_<count>`` grouped by correlation id, in count order."""
    grouped: dict[str, list[tuple[int, int]]] = {}
    for rid, value in responses:
        corrid, _, count = rid.rpartition("_")
        grouped.setdefault(corrid, []).append((int(count), value))
    return {k: [v for _, v in sorted(items)] for k, items in grouped.items()}


@pytest.mark.parametrize("dyna", [False, True], ids=["sequence", "dyna"])
def test_sequence_grpc_stream(server: ServerProcess, dyna: bool) -> None:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sequences = _sequences(dyna)
    with _grpc(server) as c:
        c.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got), stream_timeout=60)
        for model, corrid, values in sequences:  # all sent before any answer is read
            for k, v in enumerate(values):
                c.async_stream_infer(
                    model,
                    _seq_input(grpcclient, v),
                    outputs=[grpcclient.InferRequestedOutput("OUTPUT")],
                    request_id=f"{corrid}_{k + 1}",
                    sequence_id=corrid,
                    sequence_start=k == 0,
                    sequence_end=k == len(values) - 1,
                )
        responses = []
        for _ in range(sum(len(v) for _, _, v in sequences)):
            result, error = got.get(timeout=60)
            assert error is None, error
            responses.append((result.get_response().id, int(result.as_numpy("OUTPUT")[0][0])))
        c.stop_stream()
    grouped = _by_sequence(responses)
    for model, corrid, values in sequences:
        assert grouped[str(corrid)] == _expected(model, corrid, values), (model, corrid)


@pytest.mark.parametrize("dyna", [False, True], ids=["sequence", "dyna"])
def test_sequence_grpc_aio_stream(server: ServerProcess, dyna: bool) -> None:
    sequences = _sequences(dyna)

    async def requests() -> Any:
        for model, corrid, values in sequences:
            for k, v in enumerate(values):
                yield {
                    "model_name": model,
                    "inputs": _seq_input(grpcaio, v),
                    "outputs": [grpcaio.InferRequestedOutput("OUTPUT")],
                    "request_id": f"{corrid}_{k + 1}",
                    "sequence_id": corrid,
                    "sequence_start": k == 0,
                    "sequence_end": k == len(values) - 1,
                }

    async def main() -> list[tuple[str, int]]:
        out = []
        want = sum(len(v) for _, _, v in sequences)
        async with grpcaio.InferenceServerClient(server.grpc_url) as c:
            async for result, error in c.stream_infer(inputs_iterator=requests(), stream_timeout=60):
                assert error is None, error
                out.append((result.get_response().id, int(result.as_numpy("OUTPUT")[0][0])))
                if len(out) == want:
                    break
        return out

    grouped = _by_sequence(asyncio.run(main()))
    for model, corrid, values in sequences:
        assert grouped[str(corrid)] == _expected(model, corrid, values), (model, corrid)


def test_dyna_sequence_refuses_a_string_id(server: ServerProcess) -> None:
    """simple_dyna_sequence's CORRID is TYPE_UINT64: a string sequence id cannot fill it."""
    with _grpc(server) as c, pytest.raises(InferenceServerException):
        c.infer(
            "simple_dyna_sequence",
            _seq_input(grpcclient, 1),
            sequence_id="abc",
            sequence_start=True,
            sequence_end=True,
        )


# ---- decoupled repeat_int32 -------------------------------------------------------------------


def _repeat_inputs(values: list[int], delay_ms: int, wait_ms: int) -> list[grpcclient.InferInput]:
    tensors = [
        ("IN", np.array(values, dtype=np.int32), "INT32"),
        ("DELAY", np.full(len(values), delay_ms, dtype=np.uint32), "UINT32"),
        ("WAIT", np.array([wait_ms], dtype=np.uint32), "UINT32"),
    ]
    inputs = []
    for name, data, datatype in tensors:
        i = grpcclient.InferInput(name, list(data.shape), datatype)
        i.set_data_from_numpy(data)
        inputs.append(i)
    return inputs


def test_repeat_int32_stream(server: ServerProcess) -> None:
    """As simple_grpc_custom_repeat: ten responses, OUT 100..109 in order, one element each
    (shorter delays than the example's 1 s). A second request on the same stream, sent while
    the first is still answering (WAIT < its total DELAY), is answered too, each response
    carrying its own request's id, IDX counting from 0 per request."""
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with _grpc(server) as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        first = list(range(100, 110))
        second = [7, 8, 9]
        only_out = [grpcclient.InferRequestedOutput("OUT")]
        c.async_stream_infer("repeat_int32", _repeat_inputs(first, 20, 30), outputs=only_out, request_id="a")
        c.async_stream_infer("repeat_int32", _repeat_inputs(second, 10, 0), request_id="b")
        by_request: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
        for _ in range(len(first) + len(second)):
            result, error = got.get(timeout=30)
            assert error is None, error
            out = result.as_numpy("OUT")
            assert out.shape == (1,)
            idx = result.as_numpy("IDX")
            rid = result.get_response().id
            by_request[rid].append((int(idx[0]) if idx is not None else -1, int(out[0])))
        c.stop_stream()
    assert [v for _, v in by_request["a"]] == first
    assert [i for i, _ in by_request["a"]] == [-1] * len(first)  # only OUT was requested
    assert by_request["b"] == list(enumerate(second))


def test_repeat_int32_final_response(server: ServerProcess) -> None:
    """With empty final responses enabled, the last message of a request is the empty one
    flagged ``triton_final_response``; an empty IN gives that one alone."""
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with _grpc(server) as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        for values in ([5, 6], []):
            c.async_stream_infer("repeat_int32", _repeat_inputs(values, 0, 0), enable_empty_final_response=True)
            answers = [got.get(timeout=30) for _ in range(len(values) + 1)]
            assert all(error is None for _, error in answers)
            outs = [r.as_numpy("OUT") for r, _ in answers]
            assert [int(o[0]) for o in outs[:-1]] == values
            assert outs[-1] is None
            final = answers[-1][0].get_response().parameters["triton_final_response"].bool_param
            assert final is True
        c.stop_stream()


# ---- model control (explicit mode) --------------------------------------------------------------


def _index_names(c: Any, proto: str) -> list[str]:
    index = c.get_model_repository_index()
    return sorted(m["name"] if proto == "http" else m.name for m in (index if proto == "http" else index.models))


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_model_control(explicit_server: ServerProcess, proto: str) -> None:
    c: Any = _http(explicit_server) if proto == "http" else _grpc(explicit_server)
    assert _index_names(c, proto) == sorted(_script().NAMES)
    c.load_model("simple")
    assert c.is_model_ready("simple")
    c.load_model("simple", config='{"max_batch_size":"16"}')  # a configuration override
    config = c.get_model_config("simple")
    assert (config["max_batch_size"] if proto == "http" else config.config.max_batch_size) == 16
    c.unload_model("simple")
    assert not c.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as err:
        c.load_model("wrong_model_name")
    assert "failed to load" in err.value.message()
    assert c.is_server_live()
    if proto == "grpc":
        c.close()


def _bad_override(server: ServerProcess, proto: str) -> InferenceServerException:
    c: Any = _http(server) if proto == "http" else _grpc(server)
    try:
        with pytest.raises(InferenceServerException) as err:
            c.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    finally:
        if proto == "grpc":
            c.close()
    return err.value


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_model_control_bad_override_is_refused(explicit_server: ServerProcess, proto: str) -> None:
    """An override that is not JSON fails the load."""
    assert "config" in _bad_override(explicit_server, proto).message()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_model_control_bad_override_text(explicit_server: ServerProcess, proto: str) -> None:
    assert "failed to load" in _bad_override(explicit_server, proto).message()


def test_model_control_oversized_file_path(explicit_server: ServerProcess) -> None:
    """A load request carrying a file whose path is too long to write: Triton answers
    INTERNAL "failed to poll from model repository" and stays live."""
    with _grpc(explicit_server) as c:
        with pytest.raises(InferenceServerException) as err:
            c.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"})
        assert err.value.status() == "StatusCode.INTERNAL"
        assert "failed to poll from model repository" in err.value.message()
        assert c.is_server_live()
