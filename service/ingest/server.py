"""``payhook serve``, the process: the ingest application on uvloop under our own runner (what
``run_app`` does, but ``run_app`` cannot be given the runner whose connections answer an
unparseable request in our JSON format), readiness turned off first on SIGTERM, and the
start-up objects kept out of the garbage collector's way."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from typing import Any, Final

import structlog
import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.ingest.app import READINESS, create_app, unparsed_answer
from service.logs import configure_logging
from service.settings import Settings

log = structlog.get_logger("payhook.http")


# How long /readyz answers 503 before the listener closes, so a load balancer polling it stops
# sending new requests first (Kubernetes deployments add a preStop delay for the rest).
READINESS_GRACE: Final = 1.0


def _raise_graceful_exit() -> None:
    raise web.GracefulExit()


async def _readiness_first_on_sigterm(app: web.Application) -> None:
    """Replaces the runner's SIGTERM handler: /readyz turns 503 first, then the graceful
    exit stops the listener, waits for in-flight requests (``shutdown_timeout``), flushes the
    producer and closes the spool."""
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        readiness = app[READINESS]
        if readiness.shutting_down:
            return
        readiness.shut_down()
        log.info("shutdown_requested", readiness_grace=READINESS_GRACE)
        loop.call_later(READINESS_GRACE, _raise_graceful_exit)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


GC_YOUNG_THRESHOLD: Final = 10_000


async def _freeze_startup_objects(app: web.Application) -> None:
    """What start-up built lives as long as the process: keep it out of every collection the
    per-request garbage triggers (a full collection over it was a latency spike)."""
    gc.collect()
    gc.freeze()
    # A request's objects live a few milliseconds: with the default threshold (700) a young
    # collection ran every ~35 requests and traversed (and promoted) the objects of every
    # request in flight. Every ~10000 net allocations, most of them are gone by then.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


# Connections the kernel holds until the event loop accepts them. At aiohttp's 128, a burst of
# new connections (providers open one per notification) during a busy moment overflowed it, and
# each dropped SYN cost its client a retransmit: 1 s, then 3 s (mixed benchmark at 1,000/s:
# answer p99 2.7 s, the connect alone p99 2.1 s; at 1024: connect p99 under 15 ms).
BACKLOG: Final = 1024


# --- what aiohttp answers itself --------------------------------------------------------------
#
# A request aiohttp cannot parse never reaches a route: its connection handler answers it with
# ``handle_error``, in plain text that quotes the request line (``?token=`` included), with no
# request id, log line or metric. The handler below answers it through the app instead
# (``unparsed_answer``). aiohttp offers no setting for the handler class, so the runner builds
# its server with it; ``payhook serve`` and the tests' servers use this runner.


def _server_class(app: web.Application) -> type[web.Server]:
    class JsonErrorHandler(RequestHandler):
        __slots__ = ()

        def handle_error(
            self,
            request: BaseRequest,
            status: int = 500,
            exc: BaseException | None = None,
            message: str | None = None,
        ) -> web.StreamResponse:
            if request.writer.output_size > 0:  # as aiohttp's: too late for another answer
                raise ConnectionError("the response is sent already")
            response = unparsed_answer(app, status, exc)
            response.force_close()
            return response

    class JsonErrorServer(web.Server):
        def __call__(self) -> RequestHandler:
            return JsonErrorHandler(self, loop=self._loop, **self._kwargs)

    return JsonErrorServer


class IngestRunner(web.AppRunner):
    """aiohttp's AppRunner, whose connections answer unparseable requests in our format."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _server_class(self.app)
        return server


async def _run(app: web.Application, settings: Settings) -> None:
    """What ``web.run_app`` does, with :class:`IngestRunner`: serve until a signal raises
    GracefulExit, then the runner's graceful shutdown (``shutdown_timeout``)."""
    runner = IngestRunner(
        app,
        handle_signals=True,
        shutdown_timeout=settings.shutdown_timeout,
        # observed() writes the access line, without the query string (Bitfinex's token).
        access_log=None,
        # The rest of a body refused before it was read (401, 413) is read and dropped, so the
        # client gets its answer and a clean close: for as long as a body may take at all.
        lingering_time=settings.body_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port, backlog=BACKLOG)
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(settings: Settings) -> None:
    """``payhook serve``: runs until SIGINT/SIGTERM, then drains in-flight requests."""
    configure_logging(settings.log_format)
    log.info("serving", host=settings.http_host, port=settings.http_port)
    app = create_app(settings)
    app.on_startup.append(_readiness_first_on_sigterm)
    app.on_startup.append(_freeze_startup_objects)
    # uvloop: about 12% less CPU per request than asyncio's loop under the benchmark.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(app, settings))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        _cancel_all(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks: Any = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
