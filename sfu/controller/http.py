"""The controller's HTTP surface: ``GET /status`` (bearer token) and, stand-alone, an app
with ``/healthz``, ``/metrics`` and ``/status``."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator

from aiohttp import web

from sfu.common import metrics
from sfu.controller.controller import Controller

__all__ = ["CONTROLLER_KEY", "controller_app", "status_response"]

CONTROLLER_KEY = web.AppKey("controller", Controller)


async def status_response(request: web.Request, controller: Controller) -> web.StreamResponse:
    """``/status``: 404 unless a status token is configured, 401 without the right one."""
    token = controller.config.status_token
    if not token:
        return web.Response(status=404)
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        return web.json_response(
            {"errcode": "M_UNAUTHORIZED", "error": "Bearer token required"}, status=401
        )
    snap = await controller.status()
    return web.Response(text=json.dumps(snap, indent=1), content_type="application/json")


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


async def _status(request: web.Request) -> web.StreamResponse:
    return await status_response(request, request.app[CONTROLLER_KEY])


def controller_app(controller: Controller) -> web.Application:
    """The stand-alone controller (``python -m sfu controller``) as an aiohttp app."""
    app = web.Application()
    app[CONTROLLER_KEY] = controller

    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        await controller.start()
        yield
        await controller.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    return app
