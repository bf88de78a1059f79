"""The aiohttp application: routes plus the one middleware (restricted APIs, the connection
reserve, and the error map)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal.proto.errors import ServingError, detach
from shoal.server import restrict
from shoal.server.dataplane import DataPlane
from shoal.server.frontends.http.body import BodyError, HttpLimits
from shoal.server.frontends.http.connections import ConnectionGuard
from shoal.server.frontends.http.errors import error_answer
from shoal.server.frontends.http.routes import (
    CATEGORY,
    DATAPLANE,
    FORWARD,
    LIMITS,
    PEER,
    RESTRICTIONS,
    STATUS,
    add_routes,
    health_live,
    health_ready,
)
from shoal.server.headerforward import HeaderForwarder
from shoal.server.status import StatusMonitor

log = logging.getLogger("shoal.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", ConnectionGuard)


def _error(status: int, message: str, *, close: bool = False) -> web.Response:
    resp = web.json_response({"error": message}, status=status)
    if close:
        resp.force_close()
    return resp


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    restrictions = app[RESTRICTIONS]
    if restrictions:
        category = CATEGORY.get(request.match_info.handler)
        if category is not None:
            missing = restrictions.check(category, request.headers.get)
            if missing is not None:
                return _error(403, restrict.message(missing))
    guard = app.get(GUARD)
    if guard is None:
        return await _handle(request, handler)
    if not guard.begin(request):
        return _error(503, "the server has too many open HTTP connections; retry later", close=True)
    close = True
    try:
        resp = await _handle(request, handler)
    finally:
        close = guard.end(request)
    if close:
        resp.force_close()
    return resp


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except ServingError as exc:
        status, message = error_answer(exc, log, request.method, request.path)
        return _error(status, message, close=isinstance(exc, BodyError))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(exc.status, exc.reason)
        detach(exc)
        return resp
    except Exception as exc:  # noqa: BLE001 - the router never dies of one request
        return _error(*error_answer(exc, log, request.method, request.path))


def make_app(
    dataplane: DataPlane,
    limits: HttpLimits,
    *,
    restrictions: restrict.Restrictions | None = None,
    guard: ConnectionGuard | None = None,
    forward: HeaderForwarder | None = None,
    status: StatusMonitor | None = None,
) -> web.Application:
    """``status``: the status page's history (one that is never started when not given)."""
    # aiohttp's own body limit applies to the small JSON APIs; inference bodies are read by
    # ``body.read`` within ``limits``
    app = web.Application(middlewares=[middleware], client_max_size=limits.max_json_bytes)
    app[DATAPLANE] = dataplane
    app[LIMITS] = limits
    app[RESTRICTIONS] = restrictions or restrict.Restrictions()
    if guard is not None:
        app[GUARD] = guard
        app[PEER] = guard.peer
    if forward:
        app[FORWARD] = forward
    app[STATUS] = status or StatusMonitor(dataplane.models)
    add_routes(app)
    return app


def make_runner(app: web.Application, *, exit_timeout_s: float, keepalive_timeout_s: float) -> web.AppRunner:
    """The runner of the inference app (the router's, and each frontend process's)."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=exit_timeout_s,
        keepalive_timeout=keepalive_timeout_s,
        # inference bodies are inflated by frontends/http/body.py, within the body limit
        auto_decompress=False,
        # a client that disconnects cancels its request (the model sees is_cancelled());
        # repository and admin changes are shielded from it in routes.py
        handler_cancellation=True,
    )


def make_health_app(dataplane: DataPlane) -> web.Application:
    """TRTIS's health port: liveness and readiness alone, so that probes keep answering when
    the inference port is saturated or restricted."""
    app = web.Application(middlewares=[middleware])
    app[DATAPLANE] = dataplane
    app[RESTRICTIONS] = restrict.Restrictions()
    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    return app
