"""KServe v2 HTTP routes: decode, call ``DataPlane``, encode. No inference logic here."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.server import restrict, statuspage, tracing
from shoal.server.dataplane import DataPlane
from shoal.server.frontends.http import body, codec
from shoal.server.frontends.http import generate as generate_ext
from shoal.server.frontends.http.body import HttpLimits
from shoal.server.headerforward import HeaderForwarder
from shoal.server.peers import Peer
from shoal.server.status import StatusMonitor
from shoal.server.validation import version_number

if TYPE_CHECKING:
    from shoal.server.tracing import Trace

DATAPLANE: web.AppKey[DataPlane] = web.AppKey("dataplane", DataPlane)
LIMITS: web.AppKey[HttpLimits] = web.AppKey("limits", HttpLimits)
PEER: web.AppKey[Callable[[web.Request], Peer | None]] = web.AppKey("peer")
RESTRICTIONS: web.AppKey[restrict.Restrictions] = web.AppKey("restrictions", restrict.Restrictions)
FORWARD: web.AppKey[HeaderForwarder] = web.AppKey("forward", HeaderForwarder)
STATUS: web.AppKey[StatusMonitor] = web.AppKey("status", StatusMonitor)
CATEGORY: dict[Callable[..., Any], str] = {}
"""Route handler -> its restricted-API group (``server.restrict``)."""

HEADER_LENGTH = "Inference-Header-Content-Length"
_COMPRESS_ON_LOOP_BYTES = 64 << 10
"""Larger responses are compressed in a thread: a 16 MiB one takes ~100 ms of zlib."""
_JSON = "application/json"


def version_of(request: web.Request) -> int:
    """The version a request's path names (-1: none, the latest)."""
    return version_number(request.match_info.get("version") or "")


def error_body(message: str) -> bytes:
    """The JSON body of an error answer, as ``web.json_response`` writes it."""
    return json.dumps({"error": message}).encode()


def _json_response(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=_JSON)


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].live() else 400)


async def health_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if await request.app[DATAPLANE].server_ready() else 400)


async def server_metadata(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].model_metadata(request.match_info["model"], version_of(request)))


async def model_ready(request: web.Request) -> web.Response:
    if not await request.app[DATAPLANE].model_ready(request.match_info["model"], version_of(request)):
        raise T.MODEL_VERSION_NOT_READY()
    return web.Response(status=200)


async def model_config(request: web.Request) -> web.Response:
    cfg = request.app[DATAPLANE].model_config(request.match_info["model"], version_of(request))
    return _json_response(cfg)


async def logging_get(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].log_settings())


async def logging_post(request: web.Request) -> web.Response:
    try:
        changes = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"failed to parse the logging settings JSON: {exc}") from None
    if not isinstance(changes, dict):
        raise InvalidInput("logging settings must be a JSON object")
    return _json_response(request.app[DATAPLANE].update_log_settings(changes))


async def trace_setting(request: web.Request) -> web.Response:
    """GET/POST ``/v2[/models/{model}]/trace/setting`` (Triton's trace extension)."""
    dp = request.app[DATAPLANE]
    model = request.match_info.get("model", "")
    tracer = dp.trace_settings(model)
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"failed to parse the trace settings JSON: {exc}") from None
        if not isinstance(changes, dict):
            raise InvalidInput("trace settings must be a JSON object")
        tracer = await dp.change_trace_settings(model, tracing.from_json(changes))
    return _json_response(tracer.view(model))


async def model_stats(request: web.Request) -> web.Response:
    name = request.match_info.get("model", "")
    stats = await request.app[DATAPLANE].settled_statistics(name, version_of(request))
    return _json_response({"model_stats": stats})


# ---- model repository extension


async def repository_index(request: web.Request) -> web.Response:
    body = await _json_body(request, "repository index")
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("repository index 'ready' must be a boolean")
    return _json_response(request.app[DATAPLANE].repository_index(ready))


async def _load_params(request: web.Request, what: str) -> dict[str, Any]:
    body = await _json_body(request, what)
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{what} 'parameters' must be an object")
    return params


async def repository_load(request: web.Request) -> web.Response:
    params = await _load_params(request, "model load")
    await asyncio.shield(request.app[DATAPLANE].load_model(request.match_info["model"], params))
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    params = await _load_params(request, "model unload")
    await asyncio.shield(request.app[DATAPLANE].unload_model(request.match_info["model"], params))
    return web.Response(status=200)


# ---- shared-memory extensions -----------------------------------------------------------------


async def _json_body(request: web.Request, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"failed to parse the {what} JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"the {what} body must be a JSON object")
    return obj


def _peer(request: web.Request) -> Peer | None:
    get = request.app.get(PEER)
    return get(request) if get is not None else None


def _trusted(request: web.Request) -> bool:
    """The shared-memory group is restricted and this request passed the check (the
    middleware refused it otherwise)."""
    return "shared-memory" in request.app[RESTRICTIONS].rules


async def system_shm_status(request: web.Request) -> web.Response:
    regions = request.app[DATAPLANE].shm_status(request.match_info.get("region"), cuda=False, peer=_peer(request))
    return _json_response(
        [{"name": r.name, "key": r.key_given, "offset": r.offset, "byte_size": r.byte_size} for r in regions]
    )


async def system_shm_register(request: web.Request) -> web.Response:
    body = await _json_body(request, "shared memory registration")
    if "key" not in body:
        raise T.HTTP_SHM_NO_KEY()
    if "byte_size" not in body:
        raise T.HTTP_SHM_NO_BYTE_SIZE()
    request.app[DATAPLANE].register_system_shm(
        request.match_info["region"],
        body["key"],
        body.get("offset", 0),
        body["byte_size"],
        _peer(request),
        trusted=_trusted(request),
    )
    return web.Response(status=200)


async def system_shm_unregister(request: web.Request) -> web.Response:
    await request.app[DATAPLANE].unregister_shm(request.match_info.get("region"), cuda=False, peer=_peer(request))
    return web.Response(status=200)


async def cuda_shm_status(request: web.Request) -> web.Response:
    regions = request.app[DATAPLANE].shm_status(request.match_info.get("region"), cuda=True, peer=_peer(request))
    return _json_response([{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in regions])


async def cuda_shm_register(request: web.Request) -> web.Response:
    body = await _json_body(request, "shared memory registration")
    if "raw_handle" not in body:
        raise T.HTTP_SHM_NO_RAW_HANDLE()
    for field in ("device_id", "byte_size"):
        if field not in body:
            raise InvalidInput(f"CUDA shared memory registration needs '{field}'")
    handle = body["raw_handle"]
    b64 = handle.get("b64") if isinstance(handle, dict) else None
    if not isinstance(b64, str):
        raise InvalidInput("'raw_handle' must be an object {\"b64\": <base64 cudaIpcMemHandle_t>}")
    await request.app[DATAPLANE].register_cuda_shm(
        request.match_info["region"],
        b64,
        body["device_id"],
        body["byte_size"],
        _peer(request),
        trusted=_trusted(request),
    )
    return web.Response(status=200)


async def cuda_shm_unregister(request: web.Request) -> web.Response:
    await request.app[DATAPLANE].unregister_shm(request.match_info.get("region"), cuda=True, peer=_peer(request))
    return web.Response(status=200)


async def infer(request: web.Request) -> web.StreamResponse:
    dp = request.app[DATAPLANE]
    limits = request.app[LIMITS]
    model = request.match_info["model"]
    version = version_of(request)
    recv_ns = time.monotonic_ns() if dp.tracer.active else 0
    held = await body.read(request, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s, budget=limits.budget)
    try:
        if recv_ns:
            return await _infer_traced(request, dp, limits, model, version, held.data, recv_ns)
        return await _infer(request, dp, limits, model, version, held.data)
    finally:
        held.release()


async def infer_body(request: web.Request, dp: DataPlane, data: bytes | bytearray) -> web.StreamResponse:
    """An inference request whose body is read (a frontend process's, never traced there)."""
    return await _infer(request, dp, request.app[LIMITS], request.match_info["model"], version_of(request), data)


async def _infer_traced(
    request: web.Request,
    dp: DataPlane,
    limits: HttpLimits,
    model: str,
    version: int,
    data: bytes | bytearray,
    recv_ns: int,
) -> web.StreamResponse:
    """``_infer`` of a request that may be traced: Triton's HTTP_RECV_*, then the response
    sent here (HTTP_SEND_*) so that the trace is written after it."""
    recv_end_ns = time.monotonic_ns()
    trace = dp.tracer.sample(model, request.headers)
    if trace is None:
        return await _infer(request, dp, limits, model, version, data)
    trace.stamp("HTTP_RECV_START", recv_ns)
    trace.stamp("HTTP_RECV_END", recv_end_ns)
    try:
        resp = await _infer(request, dp, limits, model, version, data, trace)
        trace.stamp("INFER_RESPONSE_COMPLETE")
        trace.stamp("HTTP_SEND_START")
        await resp.prepare(request)
        await resp.write_eof()
        trace.stamp("HTTP_SEND_END")
        return resp
    finally:
        trace.finish()


async def _infer(
    request: web.Request,
    dp: DataPlane,
    limits: HttpLimits,
    model: str,
    version: int,
    data: bytes | bytearray,
    trace: Trace | None = None,
) -> web.StreamResponse:
    forward = request.app.get(FORWARD)
    payload, out_json_len = await infer_answer(
        dp,
        limits,
        request.headers.get(HEADER_LENGTH),
        model,
        version,
        data,
        lambda: _peer(request),
        request.headers.items() if forward else None,
        forward,
        trace,
    )
    headers = {}
    if out_json_len is None:
        content_type = _JSON
    else:
        content_type = "application/octet-stream"
        headers[HEADER_LENGTH] = str(out_json_len)
    accept = request.headers.get("Accept-Encoding")
    encoding = _response_encoding(accept) if accept else None
    if encoding is not None:
        if len(payload) > _COMPRESS_ON_LOOP_BYTES:  # zlib releases the GIL: other requests go on
            payload = await asyncio.get_running_loop().run_in_executor(None, _compress, payload, encoding)
        else:
            payload = _compress(payload, encoding)
        headers["Content-Encoding"] = encoding
    return web.Response(body=payload, headers=headers, content_type=content_type)


async def infer_answer(
    dp: DataPlane,
    limits: HttpLimits,
    header_length: str | None,
    model: str,
    version: int,
    data: bytes | bytearray,
    peer: Callable[[], Peer | None],
    header_items: Any = None,
    forward: HeaderForwarder | None = None,
    trace: Trace | None = None,
) -> tuple[bytes, int | None]:
    """An inference request's body in, the response body out (and its JSON part's length,
    ``None`` for an all-JSON response): the work of ``/infer`` apart from HTTP itself, shared
    by aiohttp's route and ``fastpath``. ``peer`` is called only for a request that uses shared
    memory; ``header_items`` go through ``forward`` (``--http-header-forward-pattern``)."""
    header_len = codec.parse_header_length(header_length, len(data))
    json_len = len(data) if header_len is None else header_len
    if json_len > limits.max_json_bytes:
        raise InvalidInput(
            f"request JSON size of {json_len} bytes exceeds the maximum allowed input size of "
            f"{limits.max_json_bytes} bytes. Use --http-max-input-size to increase the limit."
        )
    if header_len == 0:
        name, datatype, shape = dp.raw_input(model, version, len(data))
        req = codec.raw_request(data, model, version, name, datatype, shape)
    else:
        req = codec.decode_request(data, header_len, model, version)
    if req.uses_shm:
        req.peer = peer()
    if forward:
        forward.apply(header_items, req.parameters)
    req.trace = trace
    result = await dp.infer(req)
    try:
        chunks, out_json_len = codec.encode_result(req, result)
        payload = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
    finally:
        result.done()
    return payload, out_json_len


async def _generate_body(request: web.Request) -> tuple[DataPlane, str, int, bytes]:
    limits = request.app[LIMITS]
    held = await body.read(request, limit=limits.max_json_bytes, timeout_s=limits.body_timeout_s, budget=limits.budget)
    try:
        data = bytes(held.data)
    finally:
        held.release()
    return request.app[DATAPLANE], request.match_info["model"], version_of(request), data


async def generate(request: web.Request) -> web.Response:
    return await generate_ext.generate(request, *await _generate_body(request))


async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await generate_ext.generate_stream(request, *await _generate_body(request))


async def expect_continue(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue``: refuse an oversized body before the client sends it."""
    limit = request.app[LIMITS].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        resp = web.json_response({"error": body.too_large(length, limit).message}, status=413)
        resp.force_close()
        return resp
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


def _response_encoding(accept: str | None) -> str | None:
    """Highest-weighted of gzip / deflate / identity in ``Accept-Encoding`` (``None``: identity)."""
    if not accept:
        return None
    best, best_q = None, 0.0
    identity_q = 0.001
    for part in accept.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if token == "identity":
            identity_q = q
        elif token in ("gzip", "deflate") and q > best_q:
            best, best_q = token, q
    return best if best is not None and best_q > identity_q else None


def _compress(payload: bytes, encoding: str) -> bytes:
    c = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
    return c.compress(payload) + c.flush()


async def admin_workers(request: web.Request) -> web.Response:
    return _json_response({"workers": request.app[DATAPLANE].workers()})


async def admin_logs(request: web.Request) -> web.Response:
    """The last lines one instance's processes wrote (``?lines=N``: only the last N)."""
    m = request.match_info
    try:
        limit = int(request.query.get("lines", "0"))
    except ValueError:
        raise InvalidInput("'lines' must be a number") from None
    logs = request.app[DATAPLANE].worker_logs(m["model"], m["instance"], version_of(request), limit)
    return _json_response({"logs": logs})


async def status_page(request: web.Request) -> web.Response:
    """``GET /``: the status page (a static document that reads ``/v2/status``)."""
    return web.Response(
        body=statuspage.PAGE_BYTES,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": statuspage.CSP, "Cache-Control": "no-cache"},
    )


async def status_json(request: web.Request) -> web.Response:
    """``GET /v2/status``: what the status page shows, as JSON (``server.status``)."""
    resp = _json_response(request.app[STATUS].snapshot(request.app[DATAPLANE]))
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def admin_restart(request: web.Request) -> web.Response:
    m = request.match_info
    done = await asyncio.shield(request.app[DATAPLANE].restart_worker(m["model"], m["instance"], version_of(request)))
    return _json_response({"workers": done})


def add_routes(app: web.Application) -> None:
    v = "/versions/{version:[0-9]+}"
    r = app.router

    def add(method: str, path: str, handler: Callable[..., Any], category: str, **kw: Any) -> None:
        r.add_route(method, path, handler, **kw)
        CATEGORY[handler] = category

    add("GET", "/v2/health/live", health_live, "health")
    add("GET", "/v2/health/ready", health_ready, "health")
    add("GET", "/v2", server_metadata, "metadata")
    add("GET", "/v2/logging", logging_get, "logging")
    add("POST", "/v2/logging", logging_post, "logging")
    add("GET", "/v2/trace/setting", trace_setting, "trace")
    add("POST", "/v2/trace/setting", trace_setting, "trace")
    add("GET", "/v2/models/{model}/trace/setting", trace_setting, "trace")
    add("POST", "/v2/models/{model}/trace/setting", trace_setting, "trace")
    add("GET", "/v2/models/stats", model_stats, "statistics")
    add("POST", "/v2/repository/index", repository_index, "model-repository")
    add("POST", "/v2/repository/models/{model}/load", repository_load, "model-repository")
    add("POST", "/v2/repository/models/{model}/unload", repository_unload, "model-repository")
    add("GET", "/v2/admin/workers", admin_workers, "admin")
    add("POST", "/v2/admin/models/{model}/instances/{instance}/restart", admin_restart, "admin")
    add("POST", "/v2/admin/models/{model}" + v + "/instances/{instance}/restart", admin_restart, "admin")
    add("GET", "/v2/admin/models/{model}/instances/{instance}/logs", admin_logs, "admin")
    add("GET", "/v2/admin/models/{model}" + v + "/instances/{instance}/logs", admin_logs, "admin")
    add("GET", "/", status_page, "status")
    add("HEAD", "/", status_page, "status")
    add("GET", "/v2/status", status_json, "status")
    for kind, status, register, unregister in (
        ("systemsharedmemory", system_shm_status, system_shm_register, system_shm_unregister),
        ("cudasharedmemory", cuda_shm_status, cuda_shm_register, cuda_shm_unregister),
    ):
        base = f"/v2/{kind}"
        add("GET", base + "/status", status, "shared-memory")
        add("GET", base + "/region/{region}/status", status, "shared-memory")
        add("POST", base + "/region/{region}/register", register, "shared-memory")
        add("POST", base + "/unregister", unregister, "shared-memory")
        add("POST", base + "/region/{region}/unregister", unregister, "shared-memory")
    for prefix in ("/v2/models/{model}", "/v2/models/{model}" + v):
        add("GET", prefix, model_metadata, "metadata")
        add("GET", prefix + "/ready", model_ready, "health")
        add("GET", prefix + "/config", model_config, "model-config")
        add("GET", prefix + "/stats", model_stats, "statistics")
        add("POST", prefix + "/infer", infer, "inference", expect_handler=expect_continue)
        add("POST", prefix + "/generate", generate, "inference", expect_handler=expect_continue)
        add("POST", prefix + "/generate_stream", generate_stream, "inference", expect_handler=expect_continue)
