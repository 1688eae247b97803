"""Running ``payhook`` commands as the operator does: in-process through ``main`` (for output and
exit codes), or as a child process (to kill one mid-way)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import structlog

from schemas.events import InvoiceEvent
from service.cli import main
from service.settings import Settings
from tests.fixtures_consume import read_topic
from tests.fixtures_kafka import TEST_ENV

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def payment_event(n: int, *, invoices: int, with_order: bool) -> InvoiceEvent:
    """Event ``n``: one more payment on one of ``invoices`` Bitfinex invoices (each of its own
    order ``o-...`` when ``with_order``)."""
    return msgspec.convert(
        {
            "event_id": f"e{n}",
            "provider": "bitfinex",
            "invoice_id": f"inv-{n % invoices}",
            "order_id": f"o-{n % invoices}" if with_order else None,
            "status": "pending",
            "provider_status": "PENDING",
            "amount": "100",
            "currency": "USD",
            "pay_currency": "BTC",
            "expected_pay_amount": "1",
            "payments": [{"txid": f"tx{n}", "amount": "0.001", "currency": "BTC"}],
            "occurred_at": (T0 + timedelta(seconds=n)).isoformat(),
            "received_at": (T0 + timedelta(seconds=n)).isoformat(),
        },
        InvoiceEvent,
    )


async def event_ids_published(settings: Settings, count: int) -> set[str]:
    """The distinct event ids on the events topic, once there are ``count`` of them (a killed
    command's batch may be there twice)."""
    records = await read_topic(
        settings,
        settings.events_topic,
        lambda r: len({dict(x.headers)["event-id"] for x in r}) >= count,
        within=60,
    )
    return {dict(r.headers)["event-id"].decode() for r in records}


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    """The PAYHOOK_* environment that ``load_settings`` turns back into ``settings``."""
    return {
        **TEST_ENV,
        "PAYHOOK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "PAYHOOK_TOPIC_PREFIX": settings.topic_prefix,
        "PAYHOOK_STORE_URL": settings.store_url,
        "PAYHOOK_SPOOL_DIR": str(settings.spool_dir),
        "PAYHOOK_PUBLIC_URL": settings.public_url,
        **extra,
    }


Payhook = Callable[..., Awaitable[Ran]]


@pytest.fixture
def payhook(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Payhook:
    """``await payhook(env, *args)``: runs ``main(args)`` in a thread (commands run their own
    event loop) with exactly ``env`` as the PAYHOOK_* environment."""

    async def run(env: Mapping[str, str], *args: str) -> Ran:
        for name in list(os.environ):
            if name.startswith("PAYHOOK_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        root, kafka = logging.getLogger(), logging.getLogger("aiokafka")
        handlers, level, kafka_level = root.handlers[:], root.level, kafka.level
        try:
            code = await asyncio.to_thread(main, list(args))
        finally:
            # A command configures logging for its process; this one goes on with other tests.
            structlog.reset_defaults()
            root.handlers[:], root.level = handlers, level
            kafka.setLevel(kafka_level)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def child(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    """``payhook ARGS`` as a separate process (stdout piped, line by line)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYHOOK_")}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
