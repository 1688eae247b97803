"""Recovery end to end: the providers' simulated APIs, ``payhook recover --once``, the real
broker, the running consumer and its store, settlements read back from Kafka."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import structlog

from schemas.events import InvoiceEvent, Settlement
from service.providers import get
from service.recover.process import Options, once
from service.settings import Secret, Settings
from service.store import open_store
from tests.fixtures_consume import (
    Records,
    event_record,
    latest_settlements,
    produce,
    read_topic,
    running_consumer,
    wait_for,
)
from tests.recover.conftest import (
    BFX_KEY,
    BFX_SECRET,
    CS_KEY,
    CS_MERCHANT,
    FAST_POLICY,
    POS_KEY,
    POS_MERCHANT,
    Serve,
)
from tests.recover.simulators import (
    CUSTOMER_EMAIL,
    WEBHOOK_TOKEN,
    BitfinexSimulator,
    CryptoPosSimulator,
    CryptoSteroidSimulator,
    ManualClock,
    bitfinex_invoice,
    bitfinex_webhook_body,
    cryptopos_invoice,
    cryptosteroid_invoice,
    encode,
)

HOUR_MS = 3_600_000


@dataclasses.dataclass
class World:
    settings: Settings
    bitfinex: BitfinexSimulator
    cryptosteroid: CryptoSteroidSimulator
    cryptopos: CryptoPosSimulator
    clock: ManualClock

    def options(self) -> Options:
        return Options(clock=self.clock, policy=FAST_POLICY)


@pytest.fixture
async def world(
    consume_settings: Settings,
    serve: Serve,
    clock: ManualClock,
    bitfinex_sim: BitfinexSimulator,
    cryptosteroid_sim: CryptoSteroidSimulator,
    cryptopos_sim: CryptoPosSimulator,
) -> World:
    settings = dataclasses.replace(
        consume_settings,
        bitfinex_api_url=await serve(bitfinex_sim.app()),
        bitfinex_api_key=Secret(BFX_KEY.encode()),
        bitfinex_api_secret=Secret(BFX_SECRET.encode()),
        cryptosteroid_api_url=await serve(cryptosteroid_sim.app()),
        cryptosteroid_api_key=Secret(CS_KEY.encode()),
        cryptosteroid_merchant_id=CS_MERCHANT,
        cryptopos_api_url=await serve(cryptopos_sim.app()),
        cryptopos_api_key=Secret(POS_KEY.encode()),
        cryptopos_merchant_id=POS_MERCHANT,
    )
    return World(settings, bitfinex_sim, cryptosteroid_sim, cryptopos_sim, clock)


def now_ms() -> int:
    return int(time.time() * 1000)


def webhook_event(provider: str, body: dict[str, Any]) -> InvoiceEvent:
    """The event ``payhook serve`` publishes for this notification body."""
    handler = get(provider)
    event: InvoiceEvent = handler.normalize(handler.decode(encode(body)), datetime.now(UTC))
    return event


async def settle(
    settings: Settings, expected: set[str], versions: dict[str, int] | None = None
) -> dict[str, Settlement]:
    """The latest settlement of each invoice once every one of ``expected`` has one (of at
    least the version ``versions`` names)."""
    at_least = versions or {}

    def done(records: Records) -> bool:
        latest = latest_settlements(records)
        return all(
            key in latest and latest[key].version >= at_least.get(key, 1) for key in expected
        )

    records = await read_topic(settings, settings.settlements_topic, done, within=60)
    return latest_settlements(records)


async def events_on_topic(settings: Settings, count: int) -> Records:
    return await read_topic(settings, settings.events_topic, lambda r: len(r) >= count)


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


async def test_a_sweep_recovers_missed_notifications_into_settlements(
    world: World, capsys: pytest.CaptureFixture[str], logs: list[MutableMapping[str, Any]]
) -> None:
    settings = world.settings
    t0 = now_ms() - 40 * HOUR_MS
    # Bitfinex: 300 invoices in the lookback; every fifth expired, every seventh still waiting
    # for payment, every eleventh partly paid; the rest completed.
    statuses: dict[str, str] = {}
    for i in range(300):
        status = (
            "EXPIRED"
            if i % 5 == 0
            else "CREATED"
            if i % 7 == 0
            else "PENDING"
            if i % 11 == 0
            else "COMPLETED"
        )
        invoice = bitfinex_invoice(
            i, t0 + i * 400_000, status, amount_paid="0.00003" if status == "PENDING" else None
        )
        world.bitfinex.invoices.append(invoice)
        statuses[invoice["id"]] = status
    # 40 of them reached payhook as webhooks: those are never published again.
    known = [i for i in world.bitfinex.invoices if i["status"] in {"COMPLETED", "EXPIRED"}][:40]
    earlier = [webhook_event("bitfinex", bitfinex_webhook_body(i)) for i in known]

    # CryptoSteroid and Crypto POS: a dozen partly paid invoices each, known from a webhook.
    for i in range(12):
        partial = cryptosteroid_invoice(
            i, "WAITING", "30", updated_at="2026-11-30T10:05:00Z", hashes=["cs-h1"]
        )
        earlier.append(webhook_event("cryptosteroid", partial))
        pos_partial = cryptopos_invoice(i, [("0xa", "10", "2026-11-30T10:01:00Z")])
        earlier.append(webhook_event("cryptopos", pos_partial))
        # What the providers hold now: more arrived; half of them completed.
        if i % 2 == 0:
            now_cs = cryptosteroid_invoice(
                i, "PAID", "100.50", updated_at="2026-11-30T10:20:00Z", hashes=["cs-h1", "cs-h2"]
            )
            now_pos = cryptopos_invoice(
                i,
                [("0xa", "10", "2026-11-30T10:01:00Z"), ("0xb", "20", "2026-11-30T10:09:00Z")],
                completed=True,
            )
        else:
            now_cs = cryptosteroid_invoice(
                i, "WAITING", "60", updated_at="2026-11-30T10:15:00Z", hashes=["cs-h1", "cs-h2"]
            )
            now_pos = cryptopos_invoice(
                i, [("0xa", "10", "2026-11-30T10:01:00Z"), ("0xb", "5", "2026-11-30T10:09:00Z")]
            )
        world.cryptosteroid.invoices[now_cs["invoiceId"]] = now_cs
        world.cryptopos.invoices[now_pos["id"]] = now_pos

    async with running_consumer(settings):
        await produce(settings, [event_record(e) for e in earlier])
        await settle(settings, {f"{e.provider}:{e.invoice_id}" for e in earlier})

        assert await once(settings, world.options()) == 0
        lines = capsys.readouterr().out.splitlines()
        worth = [k for k, s in statuses.items() if s != "CREATED"]
        bitfinex_published = len(worth) - len(known)
        assert lines[0].startswith(
            f"bitfinex: ok listed=300 fetched=300 published={bitfinex_published} "
            f"skipped={300 - bitfinex_published} errors=0"
        )
        assert lines[1].startswith("cryptosteroid: ok listed=12 fetched=12 published=12 ")
        assert lines[2].startswith("cryptopos: ok listed=12 fetched=12 published=12 ")

        expected_keys = {f"bitfinex:{k}" for k in worth} | {
            f"{e.provider}:{e.invoice_id}" for e in earlier
        }
        refreshed = {f"{e.provider}:{e.invoice_id}": 2 for e in earlier if e.provider != "bitfinex"}
        settled = await settle(settings, expected_keys, refreshed)

        for key in expected_keys:
            provider, invoice_id = key.split(":", 1)
            got = settled[key]
            if provider == "bitfinex":
                want = {
                    "COMPLETED": "paid",
                    "EXPIRED": "expired",
                    "PENDING": "partially_paid",
                }[statuses[invoice_id]]
                assert got.state == want, key
                if want == "paid":
                    assert got.paid_amount == Decimal("0.00006262")
                    assert got.difference == 0
            else:
                index = int(invoice_id.rsplit("-", 1)[1])
                complete = index % 2 == 0
                if provider == "cryptosteroid":
                    assert got.paid_amount == (Decimal("100.50") if complete else Decimal(60))
                    assert got.state == ("paid" if complete else "partially_paid"), key
                else:
                    assert got.paid_amount == (Decimal(30) if complete else Decimal(15))
                    assert got.state == ("paid" if complete else "partially_paid"), key
        assert not any(k.startswith("bitfinex:") and statuses[k[9:]] == "CREATED" for k in settled)

        # A second sweep finds nothing new: it publishes nothing.
        assert await once(settings, world.options()) == 0
        second = capsys.readouterr().out.splitlines()
        assert all(" published=0 " in line for line in second), second

    total = len(earlier) + bitfinex_published + 24
    records = await events_on_topic(settings, total)
    assert len(records) == total
    origins = [msgspec.json.decode(r.value, type=InvoiceEvent).origin for r in records]
    assert origins.count("webhook") == len(earlier)
    assert origins.count("recovery") == bitfinex_published + 24
    everything = b"".join(r.value for r in records) + repr(logs).encode()
    for secret in (WEBHOOK_TOKEN, CUSTOMER_EMAIL, BFX_SECRET, CS_KEY, POS_KEY, "Jane Customer"):
        assert secret.encode() not in everything, secret
    assert sum(entry["event"] == "recovered_event" for entry in logs) == bitfinex_published + 24


async def test_a_pending_invoice_that_completes_is_recovered_on_the_next_sweep(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = world.settings
    pending = bitfinex_invoice(1, now_ms() - HOUR_MS, "PENDING", amount_paid="0.00003")
    world.bitfinex.invoices.append(pending)
    key = f"bitfinex:{pending['id']}"
    async with running_consumer(settings) as consumer:
        await wait_for(lambda: consumer.ready, what="the consumer's store")
        assert await once(settings, world.options()) == 0
        assert (await settle(settings, {key}))[key].state == "partially_paid"

        # The customer paid the rest in a second transaction; Bitfinex completed the invoice.
        completed = bitfinex_invoice(1, pending["t"], "COMPLETED", amount_paid="0.00003262")
        completed["payment"]["txid"] = "f" * 64
        completed["additionalPayments"] = [pending["payment"]]
        world.bitfinex.invoices[0] = completed
        assert await once(settings, world.options()) == 0

        def paid(records: Records) -> bool:
            latest = latest_settlements(records).get(key)
            return latest is not None and latest.state != "partially_paid"

        records = await read_topic(settings, settings.settlements_topic, paid)
        final = latest_settlements(records)[key]
        assert final.state == "paid"
        assert final.paid_amount == Decimal("0.00006262")
        assert final.version == 2
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" published=")[1].split()[0] for line in out if "bitfinex:" in line] == [
        "1",
        "1",
    ]


async def test_a_failing_provider_fails_the_sweep_and_the_others_go_on(
    world: World, capsys: pytest.CaptureFixture[str], logs: list[MutableMapping[str, Any]]
) -> None:
    settings = dataclasses.replace(world.settings, bitfinex_api_secret=Secret(b"wrong"))
    world.cryptopos.faults.extend(["500"] * FAST_POLICY.attempts)
    # The store knows one Crypto POS and one CryptoSteroid invoice, partly paid.
    cs = cryptosteroid_invoice(1, "WAITING", "30", updated_at="2026-11-30T10:05:00Z")
    pos = cryptopos_invoice(1, [("0xa", "10", "2026-11-30T10:01:00Z")])
    world.cryptosteroid.invoices[cs["invoiceId"]] = cs
    world.cryptopos.invoices[pos["id"]] = pos
    async with running_consumer(settings):
        earlier = [webhook_event("cryptosteroid", cs), webhook_event("cryptopos", pos)]
        await produce(settings, [event_record(e) for e in earlier])
        await settle(settings, {f"{e.provider}:{e.invoice_id}" for e in earlier})
        assert await once(settings, world.options()) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bitfinex: error ")
    assert "PAYHOOK_BITFINEX_API_KEY and PAYHOOK_BITFINEX_API_SECRET" in out[0]
    assert out[1].startswith("cryptosteroid: ok listed=1 fetched=1 published=0 skipped=1")
    assert out[2].startswith("cryptopos: error listed=1 fetched=0 published=0")
    assert "invoice pos-0001: HTTP 502" in out[2]
    warnings = [e for e in logs if e["event"] == "recover_error"]
    assert {e["provider"] for e in warnings} == {"bitfinex", "cryptopos"}
    assert "wrong" not in repr(logs)


async def test_without_any_api_settings_once_exits_2_naming_them(
    consume_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await once(consume_settings) == 2
    err = capsys.readouterr().err
    for name in (
        "PAYHOOK_BITFINEX_API_KEY",
        "PAYHOOK_BITFINEX_API_SECRET",
        "PAYHOOK_CRYPTOSTEROID_API_URL",
        "PAYHOOK_CRYPTOPOS_MERCHANT_ID",
    ):
        assert name in err


async def test_a_store_never_migrated_is_reported_not_created(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await once(world.settings, world.options()) == 1
    assert "start `payhook consume` first" in capsys.readouterr().err
    assert world.bitfinex.request_times == []


async def test_a_sweep_that_cannot_publish_fails_and_the_next_one_publishes(
    world: World,
    capsys: pytest.CaptureFixture[str],
    logs: list[MutableMapping[str, Any]],
    unreachable: str,
) -> None:
    world.bitfinex.invoices = [bitfinex_invoice(i, now_ms() - HOUR_MS) for i in range(2)]
    store = await open_store(world.settings.store_url)  # what consume creates
    await store.close()
    down = dataclasses.replace(world.settings, kafka_bootstrap=unreachable)
    assert await once(down, world.options()) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("bitfinex: error listed=2 fetched=2 published=0 ")
    assert "publishing 2 events failed: cannot reach Kafka" in line
    # nothing was processed, so the next sweep (Kafka back) publishes both
    assert await once(world.settings, world.options()) == 0
    assert " published=2 " in capsys.readouterr().out.splitlines()[0]
