"""Provider API simulators on free loopback ports, and a virtual clock they share with the
client under test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from service.providers.api import RetryPolicy
from tests.recover.simulators import (
    BitfinexSimulator,
    CryptoPosSimulator,
    CryptoSteroidSimulator,
    ManualClock,
)

BFX_KEY = "bfx-api-key"
BFX_SECRET = "bfx-api-secret-never-logged"
CS_KEY = "cs-api-key-never-logged"
CS_MERCHANT = "8f14e45f-ceea-467f-a0e6-9d5d3a7c8a10"
POS_KEY = "pos-api-key-never-logged"
POS_MERCHANT = "pos-merchant-1"

# Quick in tests: backoff waits happen on the virtual clock; a hang waits the real timeout.
FAST_POLICY = RetryPolicy(attempts=3, base_delay=1.0, rate_limit_delay=60.0, timeout=0.3)

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts an app on 127.0.0.1 at a free port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def bitfinex_sim(clock: ManualClock) -> BitfinexSimulator:
    return BitfinexSimulator(api_key=BFX_KEY, api_secret=BFX_SECRET, now=clock.now)


@pytest.fixture
def cryptosteroid_sim() -> CryptoSteroidSimulator:
    return CryptoSteroidSimulator(api_key=CS_KEY, merchant_id=CS_MERCHANT)


@pytest.fixture
def cryptopos_sim() -> CryptoPosSimulator:
    return CryptoPosSimulator(api_key=POS_KEY, merchant_id=POS_MERCHANT)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
