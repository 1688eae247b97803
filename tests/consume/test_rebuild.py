"""Rebuilding a lost store: an empty store and a new consumer group replaying the events topic
reproduce every settlement (same state, amounts, payments, versions; only ``updated_at``, the
time of processing, differs). The README's runbook for a lost database relies on it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from schemas.events import InvoiceEvent, Settlement
from service.consume.reconcile import invoice_key
from service.settings import Settings
from service.store import open_store
from tests.consume.test_pipeline import T0, bitfinex_event
from tests.fixtures_consume import (
    event_record,
    latest_settlements,
    produce,
    read_topic,
    running_consumer,
    wait_for,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def cryptosteroid_event(invoice_id: str, n: int, status: str, received: str) -> InvoiceEvent:
    """A CryptoSteroid event: its running total ``received`` at provider time ``n``."""
    at = (T0 + timedelta(minutes=n)).isoformat()
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-{n}-{status}-{received}",
            "provider": "cryptosteroid",
            "invoice_id": invoice_id,
            "order_id": f"order-{invoice_id}",
            "status": status,
            "provider_status": status.upper(),
            "amount": "100",
            "currency": "USD",
            "pay_currency": "USDT",
            "expected_pay_amount": "100.50",
            "payments": [
                {"txid": f"h-{invoice_id}-{k}", "amount": None, "currency": "USDT"}
                for k in range(n)
            ],
            "paid_total": received,
            "occurred_at": at,
            "received_at": datetime.now(UTC).isoformat(),
        },
        InvoiceEvent,
    )


def history() -> list[InvoiceEvent]:
    """Events of many invoices as they might arrive: partial payments, completions, repeats,
    expiries after completion, out-of-order arrivals, a running total that goes down."""
    events: list[InvoiceEvent] = []
    for i in range(12):
        inv = f"rb-bfx-{i}"
        pending = bitfinex_event(inv, 1, status="pending", payments=[(f"{inv}-a", "0.0004")])
        done = bitfinex_event(
            inv, 2, payments=[(f"{inv}-a", "0.0004"), (f"{inv}-b", f"0.000{6 + i % 3}")]
        )
        expired = bitfinex_event(inv, 3, status="expired", payments=[(f"{inv}-a", "0.0004")])
        match i % 3:
            case 0:
                events += [pending, done, pending, expired]  # a repeat; expiry never downgrades
            case 1:
                events += [done, pending]  # out of order: provider time decides
            case _:
                events += [pending, expired]  # expired underpaid
    for i in range(8):
        inv = f"rb-cs-{i}"
        events += [
            cryptosteroid_event(inv, 1, "pending", "40.25"),
            cryptosteroid_event(inv, 3, "completed", "100.50" if i % 2 else "101"),
            # older by provider time, arriving last: the later total stands
            cryptosteroid_event(inv, 2, "pending", "70"),
        ]
    return events


def comparable(settlement: Settlement) -> Settlement:
    """Everything but the processing time."""
    return msgspec.structs.replace(settlement, updated_at=EPOCH)


async def test_an_empty_store_and_a_new_group_rebuild_every_settlement(
    consume_settings: Settings, tmp_path: Path
) -> None:
    events = history()
    keys = {invoice_key(e.provider, e.invoice_id) for e in events}
    await produce(consume_settings, [event_record(e) for e in events])
    async with running_consumer(consume_settings) as original:
        published = latest_settlements(
            await read_topic(
                consume_settings,
                consume_settings.settlements_topic,
                lambda rs: latest_settlements(rs).keys() >= keys,
            )
        )
        await wait_for(lambda: original.batches > 0, what="the first store's batches")
        before = {key: await original.store.get(key) for key in keys}

    # The database is lost: an empty store, a consumer group that never committed anything.
    rebuild = dataclasses.replace(
        consume_settings,
        store_url=f"sqlite:///{tmp_path / 'rebuilt.db'}",
        consumer_group=f"{consume_settings.consumer_group}-rebuild",
    )
    async with running_consumer(rebuild) as rebuilder:
        await wait_for(
            lambda: (
                rebuilder.metrics.registry.get_sample_value(
                    "payhook_consumer_events_total", {"outcome": "processed"}
                )
                == len({e.event_id for e in events})
            ),
            within=60,
            what="every distinct event replayed",
        )
    store = await open_store(rebuild.store_url)
    try:
        after = {key: await store.get(key) for key in keys}
    finally:
        await store.close()
    for key in sorted(keys):
        old, new = before[key], after[key]
        assert old is not None, key
        assert new is not None, key
        assert comparable(new.settlement) == comparable(old.settlement), key
        assert [f.event_id for f in new.facts] == [f.event_id for f in old.facts], key
        # and what downstream holds from the compacted topic is what the rebuilt store says
        assert comparable(new.settlement) == comparable(published[key]), key
    rebuilt = [a.settlement for a in after.values() if a is not None]
    # the history covered what the rules distinguish, and versions that moved
    assert {s.state for s in rebuilt} == {"paid", "overpaid", "expired_underpaid"}
    assert max(s.version for s in rebuilt) >= 3
