"""``payhook settlement`` against the store a real consumer wrote, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from schemas.events import InvoiceEvent
from service.settings import Settings
from tests.commands.conftest import Payhook, env_of
from tests.fixtures_consume import (
    event_record,
    produce,
    read_topic,
    running_consumer,
    wait_for,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ev(n: int, invoice_id: str, order_id: str | None, status: str = "pending") -> InvoiceEvent:
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-e{n}",
            "provider": "cryptosteroid",
            "invoice_id": invoice_id,
            "order_id": order_id,
            "status": status,
            "provider_status": status.upper(),
            "amount": "100",
            "currency": "USD",
            "pay_currency": "USDT",
            "expected_pay_amount": "100.50",
            "payments": [{"txid": f"h{n}", "amount": None, "currency": "USDT"}],
            "paid_total": f"{50 * n}.25",
            "occurred_at": (T0 + timedelta(seconds=n)).isoformat(),
            "received_at": (T0 + timedelta(seconds=n)).isoformat(),
        },
        InvoiceEvent,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(
    request: pytest.FixtureRequest, consume_settings: Settings, tmp_path: Path
) -> Settings:
    if request.param == "sqlite":
        return consume_settings
    url: str = request.getfixturevalue("postgres_url")
    return dataclasses.replace(consume_settings, store_url=url)


async def test_current_history_and_order_as_on_the_topic(
    store_settings: Settings, payhook: Payhook
) -> None:
    settings = store_settings
    events = [ev(1, "inv-a", "o-1"), ev(2, "inv-a", "o-1"), ev(1, "inv-b", "o-1"), ev(1, "c", None)]
    async with running_consumer(settings):
        # inv-a changes in two batches: two versions, both published.
        await produce(settings, [event_record(events[0])])
        await read_topic(settings, settings.settlements_topic, lambda r: len(r) >= 1)
        await produce(settings, [event_record(e) for e in events[1:]])
        published = await read_topic(settings, settings.settlements_topic, lambda r: len(r) >= 4)
    on_topic = {(r.key, r.value) for r in published}
    env = env_of(settings)

    latest = await payhook(env, "settlement", "cryptosteroid", "inv-a")
    assert latest.code == 0, latest.err
    [line] = latest.out.splitlines()
    assert (b"cryptosteroid:inv-a", line.encode()) in on_topic  # byte for byte
    assert msgspec.json.decode(line)["version"] == 2

    history = await payhook(env, "settlement", "cryptosteroid", "inv-a", "--history")
    lines = history.out.splitlines()
    assert [msgspec.json.decode(x)["version"] for x in lines] == [1, 2]
    assert {(b"cryptosteroid:inv-a", x.encode()) for x in lines} <= on_topic

    order = await payhook(env, "settlement", "--order", "o-1")
    assert order.code == 0
    assert [msgspec.json.decode(x)["invoice_id"] for x in order.out.splitlines()] == [
        "inv-a",
        "inv-b",
    ]


async def test_unknown_invoice_or_order_exits_1_with_a_message(
    store_settings: Settings, payhook: Payhook
) -> None:
    settings = store_settings
    async with running_consumer(settings) as consumer:
        await wait_for(lambda: consumer.ready, what="consumer ready")  # the store exists
    env = env_of(settings)
    for args in (("bitfinex", "nope"), ("--order", "nope")):
        ran = await payhook(env, "settlement", *args)
        assert ran.code == 1
        assert ran.out == ""
        assert ran.err.startswith("payhook: no settlement for")
        assert len(ran.err.splitlines()) == 1


async def test_bad_input_is_one_line_naming_what_to_fix(
    payhook: Payhook, tmp_path: Path, settings_factory: object
) -> None:
    base = {"PAYHOOK_SIGNING_KEYS": "k:" + "a" * 44}
    cases = [
        (
            {"PAYHOOK_STORE_URL": f"sqlite:///{tmp_path}/missing.db"},
            ("bitfinex", "x"),
            1,
            "no store",
        ),
        (
            {"PAYHOOK_STORE_URL": "postgresql://u:hunter2@127.0.0.1:1/db"},
            ("bitfinex", "x"),
            1,
            "PAYHOOK_STORE_URL",
        ),
        ({"PAYHOOK_STORE_URL": "mysql://x"}, ("bitfinex", "x"), 2, "PAYHOOK_STORE_URL"),
        ({}, ("paypal", "x"), 2, "unknown provider 'paypal'"),
        ({}, ("bitfinex",), 2, "--order"),
    ]
    for env, args, code, says in cases:
        ran = await payhook({**base, **env}, "settlement", *args)
        assert ran.code == code, (args, ran)
        assert says in ran.err
        assert len(ran.err.splitlines()) == 1, ran.err
        assert "hunter2" not in ran.err
