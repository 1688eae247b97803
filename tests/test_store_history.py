"""Every settlement version and each invoice's order id, kept on SQLite and PostgreSQL alike, and
a store written by the previous release (schema version 1) migrated in place at start-up."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from schemas.events import InvoiceEvent, Settlement
from service.consume.reconcile import apply_all, apply_batch
from service.state import InvoiceState
from service.store import SCHEMA_VERSION, Store, StoreError, Writes, open_store
from service.store_reader import open_reader
from tests.fixtures_store import bitfinex_event as ev

NOW = datetime(2026, 3, 2, tzinfo=UTC)

# The previous release's schema, exactly as `git show 8a5e04b:service/store.py` creates it.
V1_DDL = (
    "CREATE TABLE IF NOT EXISTS payhook_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS invoices (
            key TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            state TEXT NOT NULL,
            data {blob}
        )""",
    """CREATE TABLE IF NOT EXISTS outbox (
            key TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        )""",
)


async def apply_events(store: Store, events: Sequence[InvoiceEvent]) -> Writes:
    def update(states: Mapping[str, InvoiceState]) -> Writes:
        result = apply_batch(states, events, NOW)
        return Writes(states=result.states, outbox=result.settlements, history=result.versions)

    return await store.transact({f"{e.provider}:{e.invoice_id}" for e in events}, update)


async def versions(url: str, key: str) -> list[Settlement]:
    reader = await open_reader(url)
    try:
        return [
            msgspec.json.decode(d, type=Settlement) for d in await reader.settlement_versions(key)
        ]
    finally:
        await reader.close()


async def of_order(url: str, order_id: str) -> list[Settlement]:
    reader = await open_reader(url)
    try:
        return [
            msgspec.json.decode(d, type=Settlement)
            for d in await reader.order_settlements(order_id)
        ]
    finally:
        await reader.close()


async def test_every_version_is_kept_even_those_a_batch_does_not_publish(
    store: Store, store_url: str
) -> None:
    # Three changes to one invoice in one batch: only v3 is published, v1..v3 are kept.
    writes = await apply_events(store, [ev(1), ev(2), ev(3)])
    assert [s.version for s in writes.outbox.values()] == [3]
    await apply_events(store, [ev(3), ev(4)])  # a duplicate adds no version
    kept = await versions(store_url, "bitfinex:inv-1")
    assert [s.version for s in kept] == [1, 2, 3, 4]
    assert [str(s.paid_amount) for s in kept] == ["0.001", "0.002", "0.003", "0.004"]
    state = await store.get("bitfinex:inv-1")
    assert state is not None
    assert kept[-1] == state.settlement
    assert await versions(store_url, "bitfinex:nope") == []


async def test_the_stored_json_is_the_published_json(store: Store, store_url: str) -> None:
    writes = await apply_events(store, [ev(1)])
    [published] = writes.outbox.values()
    reader = await open_reader(store_url)
    try:
        assert await reader.settlement_versions("bitfinex:inv-1") == [
            msgspec.json.encode(published)
        ]
    finally:
        await reader.close()


async def test_an_order_lists_the_current_settlement_of_each_of_its_invoices(
    store: Store, store_url: str
) -> None:
    await apply_events(
        store,
        [
            ev(1, invoice_id="a"),
            ev(2, invoice_id="a"),
            ev(1, invoice_id="b"),
            ev(1, invoice_id="c", order_id="o-2"),
            ev(1, invoice_id="d", order_id=None),
        ],
    )
    found = await of_order(store_url, "o-1")
    assert [(s.invoice_id, s.version) for s in found] == [("a", 2), ("b", 1)]
    assert [s.invoice_id for s in await of_order(store_url, "o-2")] == ["c"]
    assert await of_order(store_url, "o-3") == []


async def write_v1_store(url: str, states: Mapping[str, InvoiceState], unpublished: str) -> None:
    """A store as the previous release left it: its DDL, its rows."""
    rows = [
        (key, st.settlement.version, st.settlement.state, msgspec.json.encode(st))
        for key, st in states.items()
    ]
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            for statement in V1_DDL:
                db.execute(statement.format(blob="BLOB"))
            db.execute("INSERT INTO payhook_schema (version) VALUES (1)")
            db.executemany("INSERT INTO invoices VALUES (?, ?, ?, ?)", rows)
            db.execute("INSERT INTO outbox VALUES (?, ?)", (unpublished, 1))
        db.close()
        return
    conn = await asyncpg.connect(url)
    try:
        for statement in V1_DDL:
            await conn.execute(statement.format(blob="BYTEA"))
        await conn.execute("INSERT INTO payhook_schema (version) VALUES (1)")
        await conn.executemany("INSERT INTO invoices VALUES ($1, $2, $3, $4)", rows)
        await conn.execute("INSERT INTO outbox VALUES ($1, $2)", unpublished, 1)
    finally:
        await conn.close()


async def test_a_store_of_the_previous_release_is_migrated_not_recreated(store_url: str) -> None:
    a, _ = apply_all(None, [ev(1, invoice_id="a"), ev(2, invoice_id="a")], NOW)
    b, _ = apply_all(None, [ev(1, invoice_id="b", order_id="o-2")], NOW)
    assert a is not None
    assert b is not None
    await write_v1_store(store_url, {"bitfinex:a": a, "bitfinex:b": b}, "bitfinex:b")

    store = await open_store(store_url)  # what `payhook consume` does at start-up
    try:
        # Nothing lost: the states, the outbox entry still to publish.
        assert await store.get("bitfinex:a") == a
        assert [(i.key, i.version) for i in await store.unpublished()] == [("bitfinex:b", 1)]
        # The current settlement of each invoice is its first kept version; order ids indexed.
        assert await versions(store_url, "bitfinex:a") == [a.settlement]
        assert await of_order(store_url, "o-1") == [a.settlement]
        assert await of_order(store_url, "o-2") == [b.settlement]
        await apply_events(store, [ev(3, invoice_id="a")])
        assert [s.version for s in await versions(store_url, "bitfinex:a")] == [2, 3]
    finally:
        await store.close()
    reopened = await open_store(store_url)  # a second start migrates nothing again
    await reopened.close()
    assert [s.version for s in await versions(store_url, "bitfinex:a")] == [2, 3]


async def test_a_store_of_a_newer_release_is_refused(store_url: str) -> None:
    store = await open_store(store_url)
    await store.close()
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute("INSERT INTO payhook_schema (version) VALUES (?)", (SCHEMA_VERSION + 1,))
        db.close()
    else:
        conn = await asyncpg.connect(store_url)
        try:
            await conn.execute(
                "INSERT INTO payhook_schema (version) VALUES ($1)", SCHEMA_VERSION + 1
            )
        finally:
            await conn.close()
    with pytest.raises(StoreError, match="newer than this release"):
        await open_store(store_url)
