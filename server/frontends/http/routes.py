"""KServe v2 HTTP routes: decode, call ``DataPlane``, encode. No inference logic here."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from aiohttp import web

from proto.errors import InvalidInput, Unsupported
from server.dataplane import DataPlane
from server.frontends.http import codec

DATAPLANE: web.AppKey[DataPlane] = web.AppKey("dataplane", DataPlane)
MAX_JSON_BYTES: web.AppKey[int] = web.AppKey("max_json_bytes", int)

HEADER_LENGTH = "Inference-Header-Content-Length"
_JSON = "application/json"


def _version(request: web.Request) -> int:
    v = request.match_info.get("version")
    return int(v) if v else -1


def _json_response(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=_JSON)


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].live() else 400)


async def health_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].ready() else 400)


async def server_metadata(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].model_metadata(request.match_info["model"], _version(request)))


async def model_ready(request: web.Request) -> web.Response:
    request.app[DATAPLANE].model_ready(request.match_info["model"], _version(request))
    return web.Response(status=200)


async def model_config(request: web.Request) -> web.Response:
    cfg = request.app[DATAPLANE].model_config(request.match_info["model"], _version(request))
    return _json_response(cfg)


async def logging_get(request: web.Request) -> web.Response:
    return _json_response(request.app[DATAPLANE].logs.as_dict())


async def logging_post(request: web.Request) -> web.Response:
    try:
        changes = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"failed to parse the logging settings JSON: {exc}") from None
    if not isinstance(changes, dict):
        raise InvalidInput("logging settings must be a JSON object")
    return _json_response(request.app[DATAPLANE].logs.update(changes))


async def model_stats(request: web.Request) -> web.Response:
    name = request.match_info.get("model", "")
    return _json_response({"model_stats": request.app[DATAPLANE].statistics(name, _version(request))})


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
    await request.app[DATAPLANE].load_model(request.match_info["model"], params)
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    params = await _load_params(request, "model unload")
    await request.app[DATAPLANE].unload_model(request.match_info["model"], params)
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


async def system_shm_status(request: web.Request) -> web.Response:
    regions = request.app[DATAPLANE].shm.status(request.match_info.get("region"), cuda=False)
    return _json_response(
        [{"name": r.name, "key": r.key_given, "offset": r.offset, "byte_size": r.byte_size} for r in regions]
    )


async def system_shm_register(request: web.Request) -> web.Response:
    body = await _json_body(request, "shared memory registration")
    for field in ("key", "byte_size"):
        if field not in body:
            raise InvalidInput(f"system shared memory registration needs '{field}'")
    request.app[DATAPLANE].shm.register_system(
        request.match_info["region"], body["key"], body.get("offset", 0), body["byte_size"]
    )
    return web.Response(status=200)


async def system_shm_unregister(request: web.Request) -> web.Response:
    request.app[DATAPLANE].shm.unregister(request.match_info.get("region"), cuda=False)
    return web.Response(status=200)


async def cuda_shm_status(request: web.Request) -> web.Response:
    regions = request.app[DATAPLANE].shm.status(request.match_info.get("region"), cuda=True)
    return _json_response([{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in regions])


async def cuda_shm_register(request: web.Request) -> web.Response:
    body = await _json_body(request, "shared memory registration")
    for field in ("raw_handle", "device_id", "byte_size"):
        if field not in body:
            raise InvalidInput(f"CUDA shared memory registration needs '{field}'")
    handle = body["raw_handle"]
    b64 = handle.get("b64") if isinstance(handle, dict) else None
    if not isinstance(b64, str):
        raise InvalidInput("'raw_handle' must be an object {\"b64\": <base64 cudaIpcMemHandle_t>}")
    await request.app[DATAPLANE].shm.register_cuda_checked(
        request.match_info["region"], b64, body["device_id"], body["byte_size"]
    )
    return web.Response(status=200)


async def cuda_shm_unregister(request: web.Request) -> web.Response:
    request.app[DATAPLANE].shm.unregister(request.match_info.get("region"), cuda=True)
    return web.Response(status=200)


async def infer(request: web.Request) -> web.StreamResponse:
    dp = request.app[DATAPLANE]
    model = request.match_info["model"]
    version = _version(request)
    body = await _read_body(request)
    header_len = codec.parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
    if header_len is None and len(body) > request.app[MAX_JSON_BYTES]:
        raise InvalidInput(
            f"the JSON request body of {len(body)} bytes exceeds the limit of "
            f"{request.app[MAX_JSON_BYTES]} bytes (--http-max-input-size); use binary tensor data"
        )
    if header_len == 0:
        name, datatype, shape = dp.raw_input(model, version, len(body))
        req = codec.raw_request(body, model, version, name, datatype, shape)
    else:
        req = codec.decode_request(body, header_len, model, version)
    result = await dp.infer(req)
    try:
        chunks, json_len = codec.encode_result(req, result)
        payload = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
    finally:
        result.done()
    headers = {}
    if json_len is None:
        content_type = _JSON
    else:
        content_type = "application/octet-stream"
        headers[HEADER_LENGTH] = str(json_len)
    encoding = _response_encoding(request.headers.get("Accept-Encoding"))
    if encoding is not None:
        payload = _compress(payload, encoding)
        headers["Content-Encoding"] = encoding
    return web.Response(body=payload, headers=headers, content_type=content_type)


async def _read_body(request: web.Request) -> bytes:
    """The request body; aiohttp inflates gzip/deflate bodies itself (bounded by
    ``client_max_size``), so only the encoding name is checked here."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "deflate"):
        raise Unsupported(f"unsupported Content-Encoding '{encoding[:32]}'; use gzip, deflate or identity")
    return await request.read()


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


async def admin_restart(request: web.Request) -> web.Response:
    m = request.match_info
    done = await request.app[DATAPLANE].restart_worker(m["model"], m["instance"], _version(request))
    return _json_response({"workers": done})


def add_routes(app: web.Application) -> None:
    v = "/versions/{version:[0-9]+}"
    r = app.router
    r.add_get("/v2/health/live", health_live)
    r.add_get("/v2/health/ready", health_ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/logging", logging_get)
    r.add_post("/v2/logging", logging_post)
    r.add_get("/v2/models/stats", model_stats)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{model}/load", repository_load)
    r.add_post("/v2/repository/models/{model}/unload", repository_unload)
    r.add_get("/v2/admin/workers", admin_workers)
    r.add_post("/v2/admin/models/{model}/instances/{instance}/restart", admin_restart)
    r.add_post("/v2/admin/models/{model}" + v + "/instances/{instance}/restart", admin_restart)
    for kind, status, register, unregister in (
        ("systemsharedmemory", system_shm_status, system_shm_register, system_shm_unregister),
        ("cudasharedmemory", cuda_shm_status, cuda_shm_register, cuda_shm_unregister),
    ):
        base = f"/v2/{kind}"
        r.add_get(base + "/status", status)
        r.add_get(base + "/region/{region}/status", status)
        r.add_post(base + "/region/{region}/register", register)
        r.add_post(base + "/unregister", unregister)
        r.add_post(base + "/region/{region}/unregister", unregister)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}" + v):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_get(prefix + "/config", model_config)
        r.add_get(prefix + "/stats", model_stats)
        r.add_post(prefix + "/infer", infer)
