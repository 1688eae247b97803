"""The probe server of a process that serves no traffic of its own (``payhook consume``,
``payhook recover``): ``/healthz``, ``/readyz`` from the process's readiness, and ``/metrics``,
so an orchestrator and Prometheus can see it."""

from __future__ import annotations

from typing import Final, Protocol

from aiohttp import web

from service.metrics import CONTENT_TYPE
from service.readiness import Readiness


class Probed(Protocol):
    """A process's metrics: its readiness among them."""

    @property
    def readiness(self) -> Readiness: ...

    def render(self) -> bytes: ...


_PROBED: Final = web.AppKey[Probed]("probed")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[_PROBED].readiness.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_PROBED].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def create_probe_app(metrics: Probed) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` of the process ``metrics`` describe."""
    app = web.Application()
    app[_PROBED] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
