"""The aiohttp application: routes plus the one error middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proto.errors import ServingError, from_exception
from server.dataplane import DataPlane
from server.frontends.http.errors import HTTP_STATUS
from server.frontends.http.routes import DATAPLANE, MAX_JSON_BYTES, add_routes

log = logging.getLogger("shoal.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except ServingError as exc:
        return _error(HTTP_STATUS[exc.code], exc.message)
    except web.HTTPException as exc:
        if exc.status == 413:
            return _error(413, f"request body too large: {exc.text}")
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception as exc:  # noqa: BLE001 - the router never dies of one request
        log.exception("unhandled error for %s %s", request.method, request.path)
        err = from_exception(exc)
        return _error(HTTP_STATUS[err.code], err.message)


def make_app(dataplane: DataPlane, *, max_body_bytes: int, max_json_bytes: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[DATAPLANE] = dataplane
    app[MAX_JSON_BYTES] = max_json_bytes
    add_routes(app)
    return app
