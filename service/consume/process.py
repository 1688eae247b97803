"""``payhook consume``, the process: the consumer and its probe server, signals, and a
graceful shutdown that finishes the batch in flight within ``shutdown_timeout``."""

from __future__ import annotations

import asyncio
import gc
import signal

import structlog
from aiohttp import web

from service.consume.pipeline import bounded
from service.consume.supervisor import Consumer
from service.probes import create_probe_app
from service.settings import Settings
from service.tasks import cancel_and_wait

log = structlog.get_logger("payhook.consume")


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Runs the consumer and its probes until ``stop``; 0 after a clean finish."""
    consumer = Consumer(settings)
    runner = web.AppRunner(create_probe_app(consumer.metrics), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.consumer_port)
    await site.start()
    task = asyncio.create_task(consumer.run(stop))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            # Stopped on its own: a fatal error (the store cannot be opened, say).
            exc = task.exception()
            log.error("consumer_failed", error=type(exc).__name__, detail=str(exc))
            return 1
        consumer.readiness.shut_down()  # /readyz answers 503 from the first moment of shutdown
        log.info("shutdown_started")
        if not await bounded(asyncio.shield(task), settings.shutdown_timeout):
            log.error("shutdown_timeout", seconds=settings.shutdown_timeout)
            task.cancel()
            return 1
        return 0
    finally:
        stopping.cancel()
        await cancel_and_wait(task)
        await runner.cleanup()


async def _main(settings: Settings) -> int:
    # Everything alive after start-up (modules, settings) lives as long as the process: keep
    # the collector from rescanning it with every batch's garbage.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings, stop)


def run(settings: Settings) -> int:
    """``payhook consume``: blocks until SIGTERM/SIGINT, then finishes the batch in flight,
    commits and exits (0 when that took less than ``shutdown_timeout``)."""
    from service.logs import configure_logging

    configure_logging(settings.log_format)
    return asyncio.run(_main(settings))


if __name__ == "__main__":
    import sys

    from service.settings import load_settings

    sys.exit(run(load_settings(require_signing_keys=False)))
