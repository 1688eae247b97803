"""``/healthz``, ``/readyz`` and ``/metrics`` of ``payhook recover``."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from service.metrics import CONTENT_TYPE
from service.recover.metrics import RecoverMetrics

_METRICS_KEY: Final = web.AppKey("metrics", RecoverMetrics)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[_METRICS_KEY].readiness.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def create_probe_app(metrics: RecoverMetrics) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` of ``payhook recover``."""
    app = web.Application()
    app[_METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
