"""Reading the consumer's store read-only, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from schemas.events import InvoiceEvent
from service.consume.reconcile import apply_batch
from service.state import InvoiceState
from service.store import StoreError, Writes, open_store
from service.store_reader import StoreOutdated, open_reader

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def event(provider: str, invoice_id: str, status: str, paid: str | None, n: int) -> InvoiceEvent:
    running = provider != "bitfinex"
    payments = (
        [{"txid": f"tx-{invoice_id}-{n}", "amount": None if running else paid, "currency": "BTC"}]
        if paid
        else []
    )
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-e{n}",
            "provider": provider,
            "invoice_id": invoice_id,
            "order_id": None,
            "status": status,
            "provider_status": status,
            "amount": "100",
            "currency": "USD",
            "pay_currency": "BTC",
            "expected_pay_amount": "1",
            "payments": payments,
            "paid_total": paid if running else None,
            "occurred_at": (NOW + timedelta(seconds=n)).isoformat(),
            "received_at": NOW.isoformat(),
        },
        InvoiceEvent,
    )


async def write(url: str, events: Sequence[InvoiceEvent], at: datetime) -> None:
    store = await open_store(url)
    try:

        def update(states: Mapping[str, InvoiceState]) -> Writes:
            result = apply_batch(states, events, at)
            return Writes(states=result.states, outbox=result.settlements)

        await store.transact({f"{e.provider}:{e.invoice_id}" for e in events}, update)
    finally:
        await store.close()


async def test_reads_processed_ids_and_refreshable_invoices(store_url: str) -> None:
    old = NOW - timedelta(days=5)
    await write(store_url, [event("cryptopos", "pos-old", "pending", "1", 1)], old)
    await write(
        store_url,
        [
            event("cryptopos", "pos-a", "pending", "1", 1),
            event("cryptopos", "pos-a", "pending", "2", 2),
            event("cryptopos", "pos-paid", "completed", "1", 1),
            event("cryptopos", "pos-waiting", "pending", None, 1),
            event("cryptosteroid", "cs-a", "pending", "1", 1),
            event("bitfinex", "bfx-a", "pending", "1", 1),
        ],
        NOW,
    )
    reader = await open_reader(store_url)
    try:
        processed = await reader.processed_event_ids(
            ["cryptopos:pos-a", "bitfinex:bfx-a", "bitfinex:never-seen"]
        )
        assert processed == {
            "cryptopos:pos-a": frozenset({"pos-a-e1", "pos-a-e2"}),
            "bitfinex:bfx-a": frozenset({"bfx-a-e1"}),
        }
        states = ("awaiting_payment", "partially_paid", "underpaid", "expired_underpaid")
        since = NOW - timedelta(days=2)
        assert await reader.refreshable("cryptopos", states, since) == ["pos-a", "pos-waiting"]
        assert await reader.refreshable("cryptosteroid", states, since) == ["cs-a"]
        assert await reader.refreshable("cryptopos", states, old) == [
            "pos-a",
            "pos-old",
            "pos-waiting",
        ]
    finally:
        await reader.close()


async def test_sqlite_reader_runs_beside_the_consumer_and_never_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    consumer_store = await open_store(url)  # holds the consumer's exclusive lock
    try:
        reader = await open_reader(url)
        try:
            assert await reader.processed_event_ids(["cryptopos:x"]) == {}
        finally:
            await reader.close()
    finally:
        await consumer_store.close()
    db = sqlite3.connect(tmp_path / "store.db")
    assert db.execute("SELECT count(*) FROM invoices").fetchone() == (0,)
    db.close()


async def test_a_missing_or_older_store_is_reported_not_written(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="start `payhook consume` first"):
        await open_reader(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()

    older = tmp_path / "older.db"
    db = sqlite3.connect(older)
    db.execute("CREATE TABLE payhook_schema (version INTEGER NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(StoreOutdated, match="version 0, this release needs"):
        await open_reader(f"sqlite:///{older}")
    db = sqlite3.connect(older)
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("payhook_schema",)]
    db.close()


async def test_an_unmigrated_postgres_store_is_reported(postgres_url: str) -> None:
    with pytest.raises(StoreOutdated, match="payhook consume"):
        await open_reader(postgres_url)
