"""``payhook recover``: sweeps every ``PAYHOOK_RECOVER_INTERVAL`` (or once, with ``--once``).

The process reads the consumer's store read-only, talks to the configured providers' APIs
through one HTTP session, publishes with ``acks=all`` through its own producer and serves
``/healthz``, ``/readyz`` and ``/metrics`` on ``PAYHOOK_RECOVER_PORT``. Run one per set of API
keys (nonces and rate limits are per key): a single replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, final

import aiohttp
import structlog
from aiohttp import web

from schemas.events import PROVIDERS, InvoiceEvent, Provider
from service.probes import create_probe_app
from service.providers import cryptopos, cryptosteroid
from service.providers.api import Clock, LoopClock, RetryPolicy, StatusApi, StatusEndpoint
from service.providers.bitfinex import BitfinexApi
from service.recover.metrics import RecoverMetrics
from service.recover.publisher import EventPublisher
from service.recover.sweep import Summary, Sweeper
from service.settings import RECOVERY_SETTINGS, Secret, Settings, recovery_missing
from service.store import StoreError
from service.store_reader import StoreReader, open_reader
from service.tasks import cancel_and_wait

log = structlog.get_logger("payhook.recover")

_USER_AGENT: Final = "payhook-recover"


@dataclass(slots=True)
class Recovery:
    """What a running ``payhook recover`` holds."""

    sweeper: Sweeper
    metrics: RecoverMetrics


def missing_settings(settings: Settings) -> dict[Provider, tuple[str, ...]]:
    return {p: recovery_missing(settings, p) for p in PROVIDERS}


def _record(metrics: RecoverMetrics, summary: Summary) -> None:
    if not summary.configured:
        return
    provider = summary.provider
    metrics.sweeps.labels(provider, summary.outcome).inc()
    metrics.duration.labels(provider).observe(summary.seconds)
    if summary.errors:
        metrics.errors.labels(provider).inc(len(summary.errors))
    else:
        metrics.last_success.labels(provider).set(time.time())


@contextlib.asynccontextmanager
async def recovery(
    settings: Settings,
    *,
    clock: Clock | None = None,
    policy: RetryPolicy | None = None,
    wall: Callable[[], datetime] | None = None,
    metrics: RecoverMetrics | None = None,
) -> AsyncIterator[Recovery]:
    """Opens the store read-only, the HTTP session and the producer; closes them after."""
    clock = clock or LoopClock()
    policy = policy or RetryPolicy()
    metrics = metrics or RecoverMetrics()
    missing = missing_settings(settings)
    reader: StoreReader = await open_reader(settings.store_url)
    publisher = EventPublisher(settings)
    session = aiohttp.ClientSession(headers={"User-Agent": _USER_AGENT})
    try:

        def counting(provider: str) -> Callable[[str], None]:
            return lambda outcome: metrics.requests.labels(provider, outcome).inc()

        bitfinex: BitfinexApi | None = None
        if not missing["bitfinex"]:
            assert settings.bitfinex_api_key is not None
            assert settings.bitfinex_api_secret is not None
            bitfinex = BitfinexApi(
                session,
                url=settings.bitfinex_api_url,
                key=settings.bitfinex_api_key,
                secret=settings.bitfinex_api_secret,
                clock=clock,
                policy=policy,
                on_request=counting("bitfinex"),
            )
        refresh: dict[Provider, StatusApi] = {}
        status_apis: list[
            tuple[
                Provider,
                Callable[[str, Secret, str], StatusEndpoint],
                str | None,
                Secret | None,
                str | None,
            ]
        ] = [
            (
                "cryptosteroid",
                cryptosteroid.status_endpoint,
                settings.cryptosteroid_api_url,
                settings.cryptosteroid_api_key,
                settings.cryptosteroid_merchant_id,
            ),
            (
                "cryptopos",
                cryptopos.status_endpoint,
                settings.cryptopos_api_url,
                settings.cryptopos_api_key,
                settings.cryptopos_merchant_id,
            ),
        ]
        for provider, endpoint, url, key, merchant_id in status_apis:
            if missing[provider]:
                continue
            assert url is not None
            assert key is not None
            assert merchant_id is not None
            refresh[provider] = StatusApi(
                session,
                endpoint(url, key, merchant_id),
                clock=clock,
                policy=policy,
                on_request=counting(provider),
            )
        started = time.time()
        for provider in PROVIDERS:
            swept = not missing[provider]
            metrics.configured.labels(provider).set(1 if swept else 0)
            if swept:
                # A fresh process gets the alert's 30 minutes before its first success is due.
                metrics.last_success.labels(provider).set(started)
                # Every series an alert or panel reads exists from the first scrape.
                for outcome in ("ok", "error"):
                    metrics.sweeps.labels(provider, outcome)
                metrics.published.labels(provider, "completed")
                metrics.errors.labels(provider)
                metrics.requests.labels(provider, "ok")
                metrics.duration.labels(provider)

        def published(event: InvoiceEvent) -> None:
            metrics.published.labels(event.provider, event.status).inc()

        sweeper = Sweeper(
            store=reader,
            publish=publisher.publish,
            lookback=settings.recover_lookback,
            bitfinex=bitfinex,
            refresh=refresh,
            missing={p: m for p, m in missing.items() if m},
            wall=wall,
            on_summary=lambda summary: _record(metrics, summary),
            on_published=published,
        )
        yield Recovery(sweeper=sweeper, metrics=metrics)
    finally:
        await session.close()
        await publisher.close()
        await reader.close()


def none_configured_message() -> str:
    names = "; ".join(
        f"{provider}: {', '.join(name for name, _ in needed)}"
        for provider, needed in RECOVERY_SETTINGS.items()
    )
    return f"payhook: no provider's API is configured, nothing to recover (set {names})\n"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What tests replace: the pacing clock, the retry policy, the wall clock."""

    clock: Clock | None = None
    policy: RetryPolicy | None = None
    wall: Callable[[], datetime] | None = None


async def once(settings: Settings, options: Options = Options()) -> int:
    """One sweep of every configured provider; a line per provider on stdout. 0 when every
    configured provider's sweep succeeded, 1 otherwise, 2 when none is configured."""
    if all(missing_settings(settings).values()):
        sys.stderr.write(none_configured_message())
        return 2
    try:
        async with recovery(
            settings, clock=options.clock, policy=options.policy, wall=options.wall
        ) as running:
            summaries = await running.sweeper.sweep()
    except StoreError as exc:
        sys.stderr.write(f"payhook: {exc}\n")
        return 1
    for summary in summaries:
        print(summary.line(), flush=True)
    return 0 if all(s.ok for s in summaries if s.configured) else 1


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _sweep_until(stop: asyncio.Event, running: Recovery, interval: float) -> None:
    while not stop.is_set():
        sweep = asyncio.create_task(running.sweeper.sweep())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({sweep, stopping}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(stopping)
        if not sweep.done():
            await cancel_and_wait(sweep)
            return
        sweep.result()
        if await _stopped_within(stop, interval):
            return


async def serve(settings: Settings, stop: asyncio.Event, options: Options = Options()) -> int:
    """Sweeps every ``recover_interval`` until ``stop``; a sweep in flight is abandoned (what
    it did not publish, the next sweep finds). The probes answer from the start; until the
    store can be read (``payhook consume`` creates and migrates it) ``/readyz`` says 503 and
    the store is tried again. Without any provider configured it idles and says so."""
    metrics = RecoverMetrics()
    runner = web.AppRunner(create_probe_app(metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.recover_port).start()
        log.info("recover_started", port=settings.recover_port)
        if all(missing_settings(settings).values()):
            log.warning("recover_not_configured", detail=none_configured_message().strip())
        while not stop.is_set():
            try:
                async with recovery(
                    settings,
                    clock=options.clock,
                    policy=options.policy,
                    wall=options.wall,
                    metrics=metrics,
                ) as running:
                    metrics.readiness.set(True)
                    await _sweep_until(stop, running, settings.recover_interval)
            except StoreError as exc:
                log.error("recover_store_unavailable", detail=str(exc))
                await _stopped_within(stop, min(settings.recover_interval, 30.0))
        return 0
    finally:
        metrics.readiness.shut_down()
        await runner.cleanup()


async def _main(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings, stop)


def run(settings: Settings, *, once_only: bool = False) -> int:
    """``payhook recover [--once]``."""
    from service.logs import configure_logging

    if once_only and all(missing_settings(settings).values()):
        sys.stderr.write(none_configured_message())
        return 2
    configure_logging(settings.log_format)
    if once_only:
        return asyncio.run(once(settings))
    return asyncio.run(_main(settings))
