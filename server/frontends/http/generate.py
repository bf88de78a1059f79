"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` (one JSON
response) and ``.../generate_stream`` (Server-Sent Events, one ``data:`` event per response).

Request JSON: every key naming a model input becomes that input (a string is a BYTES element,
a boolean BOOL, a number of the input's datatype; a list of them a 1-D tensor; a batching
model's inputs get a batch dimension of 1); ``parameters`` (an object) and every other key
become request parameters. Each response is ``{"model_name", "model_version", <output>: value,
...}``: a one-element output as a scalar (BYTES as a UTF-8 string), a larger one as a flat list.
Errors before inference are JSON with an error status; an error during a stream is an event
``data: {"error": ...}`` (the status line was sent with the first event), as Triton does.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from shoal.proto import dtypes
from shoal.proto.errors import InvalidInput, ServingError, from_exception
from shoal.server.dataplane import DataPlane
from shoal.server.frontends.http import codec
from shoal.server.types import InferRequest, InferResult, InputTensor, UseProxy

_BOOL_OK = frozenset({"BOOL"})
_MAX_ELEMENTS = 1 << 24
_COALESCE_BYTES = 1 << 16
"""Events ready at once are written together up to this many bytes."""


def _parse(body: bytes | bytearray) -> dict[str, Any]:
    try:
        obj = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"failed to parse the generate request JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput("the generate request body must be a JSON object")
    return obj


def _tensor(name: str, datatype: str, value: Any, batching: bool) -> InputTensor:
    values = value if isinstance(value, list) else [value]
    if len(values) > _MAX_ELEMENTS or any(isinstance(v, (list, dict)) for v in values):
        raise InvalidInput(f"generate input '{name}' must be a scalar or a flat list of scalars")
    dt = dtypes.BY_PROTOCOL[datatype]
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"generate input '{name}' of datatype BYTES must be a string")
        data = dtypes.serialize_bytes(np.array(values, dtype=np.object_))
    elif datatype in _BOOL_OK:
        if not all(type(v) is bool for v in values):
            raise InvalidInput(f"generate input '{name}' of datatype BOOL must be a boolean")
        data = np.array(values, dtype=np.bool_).tobytes()
    else:
        if dt.numpy is None or not all(type(v) in (int, float) for v in values):
            raise InvalidInput(f"generate input '{name}' of datatype {datatype} must be a number")
        if dt.numpy.kind in "iu" and not all(type(v) is int for v in values):
            raise InvalidInput(f"generate input '{name}' of datatype {datatype} must be an integer")
        try:
            with np.errstate(over="raise"):
                data = np.array(values, dtype=dt.numpy).tobytes()
        except (OverflowError, FloatingPointError):
            raise InvalidInput(f"generate input '{name}': a value is out of range for {datatype}") from None
    shape: tuple[int, ...] = (len(values),)
    if batching:
        shape = (1, *shape)
    return InputTensor(name=name, datatype=datatype, shape=shape, data=data)


def to_request(dp: DataPlane, model: str, version: int, obj: dict[str, Any]) -> InferRequest:
    """The inference request a generate body stands for."""
    spec = dp.model_metadata(model, version)
    batching = dp.model_config_message(model, version).max_batch_size > 0
    by_name = {t["name"]: t["datatype"] for t in spec["inputs"]}
    inputs: list[InputTensor] = []
    params: dict[str, Any] = {}
    extra = obj.get("parameters", {})
    if not isinstance(extra, dict):
        raise InvalidInput("generate request 'parameters' must be an object")
    for key, value in extra.items():
        if isinstance(value, (list, dict)) or value is None:
            raise InvalidInput(f"generate parameter '{key}' must be a string, number or boolean")
        params[key] = value
    for key, value in obj.items():
        if key == "parameters":
            continue
        if key in by_name:
            inputs.append(_tensor(key, by_name[key], value, batching))
        elif isinstance(value, (str, int, float, bool)):
            params[key] = value
        else:
            raise InvalidInput(f"generate request field '{key}' is not an input of model '{model}' nor a parameter")
    if any(k.startswith("triton_") for k in params):
        raise InvalidInput(
            "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified."
        )
    return InferRequest(model_name=model, model_version=version, inputs=inputs, parameters=params)


def to_json(result: InferResult) -> dict[str, Any]:
    """A response's outputs as generate fields (the infer endpoint's JSON conversion: BYTES as
    UTF-8 strings, no FP16/BF16)."""
    out: dict[str, Any] = {"model_name": result.model_name, "model_version": str(result.model_version)}
    for t in result.outputs:
        data = codec.json_values(t.name, t.datatype, t.shape, t.data)
        values = data.tolist() if isinstance(data, np.ndarray) else data
        out[t.name] = values[0] if len(values) == 1 else values
    return out


def _error_json(err: ServingError) -> bytes:
    return orjson.dumps({"error": err.message})


async def generate(request: web.Request, dp: DataPlane, model: str, version: int, body: bytes) -> web.Response:
    """``/generate``: exactly one response (a decoupled model must send exactly one)."""
    req = to_request(dp, model, version, _parse(body))
    doc: dict[str, Any] | None = None
    stream = _responses(dp, req)
    try:
        async for item in stream:
            if isinstance(item, ServingError):
                raise item
            try:
                if doc is not None:
                    raise InvalidInput(f"model '{model}' sent more than one response: use generate_stream")
                doc = to_json(item)
            finally:
                item.done()
    finally:
        await stream.aclose()
    if doc is None:
        raise InvalidInput(f"model '{model}' sent no response")
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def generate_stream(
    request: web.Request, dp: DataPlane, model: str, version: int, body: bytes
) -> web.StreamResponse:
    """``/generate_stream``: one SSE event per response; errors before the first response
    are a JSON error with its status (the caller's error handling), later ones are events."""
    req = to_request(dp, model, version, _parse(body))
    stream = _responses(dp, req)
    resp: web.StreamResponse | None = None
    events: list[bytes] = []  # written together while more responses are already waiting
    size = 0
    try:
        async for item in stream:
            if resp is None:
                if isinstance(item, ServingError):
                    raise item  # nothing sent yet: an ordinary error response
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
                await resp.prepare(request)
            if isinstance(item, ServingError):
                event = _error_json(item)
            else:
                try:
                    event = orjson.dumps(to_json(item))
                except ServingError as exc:
                    event = _error_json(exc)
                finally:
                    item.done()
            events.append(b"data: " + event + b"\n\n")
            size += len(event)
            # one write (one system call, one wake-up of the client) for every response that
            # is ready; none waits for a response still to come
            if req.backlog is None or not req.backlog() or size >= _COALESCE_BYTES:
                await resp.write(b"".join(events))
                events.clear()
                size = 0
        if events and resp is not None:
            await resp.write(b"".join(events))
    finally:
        await stream.aclose()
    if resp is None:  # no response at all: an empty event stream
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
    await resp.write_eof()
    return resp


async def _responses(dp: DataPlane, req: InferRequest) -> AsyncGenerator[InferResult | ServingError, None]:
    """Every response of ``req`` (one for a model that is not decoupled); a failure is yielded
    as the ``ServingError`` it is, and ends the stream."""
    try:
        if not dp.is_decoupled(req.model_name, req.model_version):
            yield await dp.infer(req)
            return
        stream = dp.infer_stream(req)
        try:
            async for item, _final in stream:
                if item is not None:
                    yield item
                if isinstance(item, ServingError):
                    return
        finally:
            await stream.aclose()
    except UseProxy:
        raise  # (a frontend process) before any response: the router answers it
    except ServingError as exc:
        yield exc
    except Exception as exc:  # noqa: BLE001 - reported in the stream like Triton's errors
        yield from_exception(exc)
