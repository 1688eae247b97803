"""``payhook recover`` as an operator runs it: the command, its exit codes, its probes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from devtools.devbroker import free_port
from service.cli import main
from service.recover import process
from service.settings import Secret, Settings
from tests.fixtures_consume import running_consumer, wait_for
from tests.recover.conftest import BFX_KEY, BFX_SECRET, CS_KEY, CS_MERCHANT, Serve
from tests.recover.simulators import (
    BitfinexSimulator,
    CryptoSteroidSimulator,
    bitfinex_invoice,
)

PAYHOOK = Path(sys.executable).parent / "payhook"


def recover_env(settings: Settings, bitfinex_url: str, cryptosteroid_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYHOOK_")}
    env.update(
        {
            "PAYHOOK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "PAYHOOK_TOPIC_PREFIX": settings.topic_prefix,
            "PAYHOOK_STORE_URL": settings.store_url,
            "PAYHOOK_BITFINEX_API_URL": bitfinex_url,
            "PAYHOOK_BITFINEX_API_KEY": BFX_KEY,
            "PAYHOOK_BITFINEX_API_SECRET": BFX_SECRET,
            "PAYHOOK_CRYPTOSTEROID_API_URL": cryptosteroid_url,
            "PAYHOOK_CRYPTOSTEROID_API_KEY": CS_KEY,
            "PAYHOOK_CRYPTOSTEROID_MERCHANT_ID": CS_MERCHANT,
            "PAYHOOK_LOG_FORMAT": "json",
        }
    )
    return env


def test_once_without_any_provider_configured_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("PAYHOOK_"):
            monkeypatch.delenv(name)
    assert main(["recover", "--once"]) == 2
    assert "PAYHOOK_BITFINEX_API_SECRET" in capsys.readouterr().err


def test_help_names_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    out = capsys.readouterr().out
    for name in ("PAYHOOK_RECOVER_INTERVAL", "PAYHOOK_RECOVER_PORT", "PAYHOOK_BITFINEX_API_KEY"):
        assert name in out


async def test_the_command_sweeps_once_then_serves_probes_until_sigterm(
    consume_settings: Settings,
    serve: Serve,
    bitfinex_sim: BitfinexSimulator,
    cryptosteroid_sim: CryptoSteroidSimulator,
) -> None:
    now = int(time.time() * 1000)
    bitfinex_sim.invoices = [bitfinex_invoice(i, now - i * 60_000) for i in range(5)]
    env = recover_env(
        consume_settings,
        await serve(bitfinex_sim.app()),
        await serve(cryptosteroid_sim.app()),
    )
    async with running_consumer(consume_settings) as consumer:
        await wait_for(lambda: consumer.ready, what="the consumer's store")
        once = await asyncio.create_subprocess_exec(
            str(PAYHOOK),
            "recover",
            "--once",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(once.communicate(), 60)
        assert once.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[0].startswith("bitfinex: ok listed=5 fetched=5 published=5 skipped=0")
        assert lines[1].startswith("cryptosteroid: ok listed=0 fetched=0 published=0")
        assert lines[2].startswith("cryptopos: not configured (set PAYHOOK_CRYPTOPOS_API_URL")
        assert BFX_SECRET.encode() not in err

        port = free_port()
        env |= {"PAYHOOK_RECOVER_PORT": str(port), "PAYHOOK_RECOVER_INTERVAL": "0.2"}
        process = await asyncio.create_subprocess_exec(
            str(PAYHOOK), "recover", env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with aiohttp.ClientSession() as http:
                metrics = ""

                async def probe() -> bool:
                    nonlocal metrics
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                            metrics = await r.text()
                    except aiohttp.ClientError:
                        return False
                    return 'payhook_recover_sweeps_total{outcome="ok",provider="bitfinex"} 2.0' in (
                        metrics
                    )

                deadline = time.monotonic() + 30
                while not await probe():
                    assert process.returncode is None
                    assert time.monotonic() < deadline, metrics
                    await asyncio.sleep(0.1)
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    assert r.status == 200
            assert "payhook_recover_last_success_timestamp_seconds" in metrics
            assert 'payhook_recover_configured{provider="cryptopos"} 0.0' in metrics
            # Nothing new since --once: the sweeps published nothing more.
            published = (
                'payhook_recover_events_published_total{provider="bitfinex",status="completed"}'
            )
            assert f"{published} 0.0" in metrics
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()


async def test_serve_waits_for_the_consumers_store_and_answers_probes_meanwhile(
    consume_settings: Settings,
    serve: Serve,
    bitfinex_sim: BitfinexSimulator,
) -> None:
    settings = dataclasses.replace(
        consume_settings,
        recover_port=free_port(),
        recover_interval=0.2,
        bitfinex_api_url=await serve(bitfinex_sim.app()),
        bitfinex_api_key=Secret(BFX_KEY.encode()),
        bitfinex_api_secret=Secret(BFX_SECRET.encode()),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(process.serve(settings, stop))
    base = f"http://127.0.0.1:{settings.recover_port}"
    async with aiohttp.ClientSession() as http:

        async def status(path: str) -> int | None:
            try:
                async with http.get(base + path) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

        deadline = time.monotonic() + 20
        while await status("/healthz") != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # no store yet: alive, not ready, and the provider is not asked
        assert await status("/readyz") == 503
        assert bitfinex_sim.request_times == []
        async with running_consumer(settings) as consumer:
            await wait_for(lambda: consumer.ready, what="the consumer's store")
            while await status("/readyz") != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await wait_for(lambda: len(bitfinex_sim.request_times) >= 1, what="a sweep")
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
