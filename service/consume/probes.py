"""The consumer's probe server: ``/healthz``, ``/readyz`` (from the consumer's readiness) and
``/metrics``. It serves no traffic of its own; it only lets an orchestrator and Prometheus see
the consumer."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from service.consume.supervisor import Consumer
from service.metrics import CONTENT_TYPE

CONSUMER_KEY: Final = web.AppKey("consumer", Consumer)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[CONSUMER_KEY].readiness.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[CONSUMER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def create_probe_app(consumer: Consumer) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` of the consumer."""
    app = web.Application()
    app[CONSUMER_KEY] = consumer
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
