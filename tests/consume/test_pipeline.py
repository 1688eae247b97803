"""The consumer against the real Tansu broker and real stores."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devtools.devbroker import LocalBroker
from schemas.events import InvoiceEvent
from service.consume import pipeline, supervisor
from service.consume.pipeline import BATCH_INTERVAL, FETCH_LEAD
from service.consume.process import serve
from service.consume.reconcile import InvoiceState, apply_batch, invoice_key
from service.consume.supervisor import Consumer
from service.kafka import TOPIC_PARTITIONS, encode_event
from service.settings import Settings
from service.store import OutboxItem, Published, Store, W, Writes, open_store
from tests.fixtures_consume import (
    Record,
    Records,
    consumer_settings,
    counter,
    event_record,
    latest_settlements,
    produce,
    read_topic,
    running_consumer,
    settlements_of,
    wait_for,
)

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def bitfinex_event(
    invoice_id: str,
    n: int,
    *,
    status: str = "completed",
    payments: Sequence[tuple[str, str]] = (),
    expected: str | None = "0.001",
) -> InvoiceEvent:
    """A Bitfinex event; ``n`` orders it in provider time and makes its id unique."""
    at = (T0 + timedelta(minutes=n)).isoformat()
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-{n}-{status}",
            "provider": "bitfinex",
            "invoice_id": invoice_id,
            "order_id": f"order-{invoice_id}",
            "status": status,
            "provider_status": status.upper(),
            "amount": "50",
            "currency": "USD",
            "pay_currency": "BTC" if expected else None,
            "expected_pay_amount": expected,
            "payments": [
                {"txid": tx, "amount": amount, "currency": "BTC", "created_at": at}
                for tx, amount in payments
            ],
            "occurred_at": at,
            "received_at": datetime.now(UTC).isoformat(),
        },
        InvoiceEvent,
    )


async def test_events_in_settlements_out(consume_settings: Settings) -> None:
    s = consume_settings
    paid = bitfinex_event("a", 1, payments=[("tx-a", "0.001")])
    partial = bitfinex_event("b", 1, status="pending", payments=[("tx-b1", "0.0004")])
    rest = bitfinex_event("b", 2, payments=[("tx-b1", "0.0004"), ("tx-b2", "0.0006")])
    await produce(s, [event_record(e) for e in (paid, partial, rest, paid)])
    async with running_consumer(s) as consumer:
        records = await read_topic(
            s,
            s.settlements_topic,
            lambda rs: (
                latest_settlements(rs).get("bitfinex:b", None) is not None
                and latest_settlements(rs)["bitfinex:b"].state == "paid"
            ),
        )
        await wait_for(
            lambda: counter(consumer, "payhook_consumer_events_total", outcome="duplicate") == 1,
            what="the duplicate to be counted",
        )
        assert counter(consumer, "payhook_consumer_events_total", outcome="processed") == 3
        assert counter(consumer, "payhook_settlements_total", state="paid") >= 2
        assert consumer.metrics.registry.get_sample_value(
            "payhook_settlement_latency_seconds_count"
        )
    latest = latest_settlements(records)
    a, b = latest["bitfinex:a"], latest["bitfinex:b"]
    assert (a.state, a.paid_amount, a.version) == ("paid", Decimal("0.001"), 1)
    assert (b.state, b.paid_amount, b.difference) == ("paid", Decimal("0.0010"), Decimal(0))
    assert b.last_event_id == rest.event_id
    assert [r.key for r in records if r.key == b"bitfinex:a"] == [b"bitfinex:a"]  # once
    # Every settlement record is keyed by its invoice, decodes as a Settlement, and sits on the
    # partition its key gives (the same as the invoice's events, the topics being alike).
    events = await read_topic(s, s.events_topic, lambda rs: len(rs) == 4)
    partition_of = {r.key: r.partition for r in events}
    for record, settlement in zip(records, settlements_of(records), strict=True):
        assert record.key == invoice_key(settlement.provider, settlement.invoice_id).encode()
        assert record.partition == partition_of[record.key]


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """The consumer group's committed offsets per partition (of the events topic)."""
    # Tansu's answer to the admin client's OffsetFetch does not decode; a consumer's does.
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        found = {}
        for partition in range(TOPIC_PARTITIONS):
            offset = await reader.committed(TopicPartition(settings.events_topic, partition))
            if offset is not None:
                found[partition] = offset
        return found
    finally:
        await reader.stop()


def naive_time_record() -> Record:
    body = msgspec.json.decode(encode_event(bitfinex_event("ok", 1)))
    body["occurred_at"] = "2026-05-01T09:00:00"  # no time zone: cannot be ordered
    return b"bitfinex:ok", msgspec.json.encode(body), [("event-id", b"ok-1")]


async def test_undecodable_and_invalid_records_go_to_the_dlq_and_processing_goes_on(
    consume_settings: Settings,
) -> None:
    s = consume_settings
    good = bitfinex_event("ok", 2, payments=[("tx-ok", "0.001")])
    wrong_key = event_record(bitfinex_event("other", 1))
    poison: list[Record] = [
        (b"bitfinex:x", b"{not json", [("event-id", b"x")]),
        (b"bitfinex:y", b'{"schema": "payhook.invoice-event.v1", "event_id": 7}', []),
        naive_time_record(),
        (b"bitfinex:someone-else", wrong_key[1], wrong_key[2]),
    ]
    # All on one key's partition, poison first, so the good record comes after them.
    await produce(s, [(b"bitfinex:ok", v, h) for _, v, h in poison] + [event_record(good)])
    async with running_consumer(s) as consumer:
        dlq = await read_topic(s, s.dlq_topic, lambda rs: len(rs) >= 4)
        settled = await read_topic(s, s.settlements_topic, lambda rs: len(rs) >= 1)
        await wait_for(
            lambda: counter(consumer, "payhook_consumer_events_total", outcome="dlq") == 4
        )
        assert counter(consumer, "payhook_consumer_events_total", outcome="processed") == 1
    assert [r.value for r in dlq] == [v for _, v, _ in poison]
    assert all(r.key == b"bitfinex:ok" for r in dlq)
    for record in dlq:
        headers = dict(record.headers)
        assert headers["source-topic"] == s.events_topic.encode()
        assert int(headers["source-partition"]) >= 0
        assert "error" in headers
    errors = [dict(r.headers)["error"].decode() for r in dlq]
    assert errors[0].startswith("undecodable: ")
    assert "$.event_id" in errors[1]
    # The schema types times as aware: the decoder itself refuses a naive one.
    assert errors[2].startswith("undecodable: ")
    assert "$.occurred_at" in errors[2]
    assert errors[3] == "invalid: record key does not match provider:invoice_id"
    offsets = sorted(int(dict(r.headers)["source-offset"]) for r in dlq)
    assert offsets == [0, 1, 2, 3]
    assert dict(dlq[0].headers)["event-id"] == b"x"  # original headers kept
    assert latest_settlements(settled)["bitfinex:ok"].state == "paid"
    assert sum((await committed_offsets(s)).values()) == 5  # past every record


async def test_restart_reprocesses_harmlessly(consume_settings: Settings) -> None:
    s = consume_settings
    events = [
        bitfinex_event("h", 1, status="pending", payments=[("h1", "0.0004")]),
        bitfinex_event("h", 2, payments=[("h1", "0.0004"), ("h2", "0.0006")]),
        bitfinex_event("i", 1, payments=[("i1", "0.001")]),
    ]
    await produce(s, [event_record(e) for e in events])
    async with running_consumer(s) as first:
        before = await read_topic(
            s,
            s.settlements_topic,
            lambda rs: (
                latest_settlements(rs).keys() == {"bitfinex:h", "bitfinex:i"}
                and latest_settlements(rs)["bitfinex:h"].state == "paid"
            ),
        )
        await wait_for(
            lambda: counter(first, "payhook_consumer_events_total", outcome="processed") == 3
        )
    assert sum((await committed_offsets(s)).values()) == 3  # committed after the batch
    # A consumer that lost its offsets (a new group) reads everything again: all duplicates.
    again = dataclasses.replace(s, consumer_group=f"{s.consumer_group}-again")
    async with running_consumer(again) as second:
        await wait_for(
            lambda: counter(second, "payhook_consumer_events_total", outcome="duplicate") == 3,
            what="every event to be seen again",
        )
        assert counter(second, "payhook_consumer_events_total", outcome="processed") == 0
        assert counter(second, "payhook_settlements_total", state="paid") == 0
    after = await read_topic(s, s.settlements_topic, lambda rs: len(rs) >= len(before))
    assert len(after) == len(before)  # nothing new was published
    store = await open_store(s.store_url)
    state = await store.get("bitfinex:h")
    await store.close()
    assert state is not None
    assert state.settlement.paid_amount == Decimal("0.0010")


async def test_a_stored_but_unpublished_settlement_is_published_at_start(
    consume_settings: Settings,
) -> None:
    """As if the consumer died between its store transaction and the publish."""
    s = consume_settings
    event = bitfinex_event("crash", 1, payments=[("c1", "0.001")])
    store = await open_store(s.store_url)
    try:
        await store.transact(
            {"bitfinex:crash"},
            lambda states: _writes(apply_batch(states, [event], datetime.now(UTC))),
        )
        assert len(await store.unpublished()) == 1
    finally:
        await store.close()
    # The record itself is redelivered too (its offset was never committed): a duplicate.
    await produce(s, [event_record(event)])
    async with running_consumer(s) as consumer:
        records = await read_topic(s, s.settlements_topic, lambda rs: len(rs) >= 1)
        await wait_for(
            lambda: counter(consumer, "payhook_consumer_events_total", outcome="duplicate") == 1
        )
        assert await consumer.store.unpublished() == []
    [settlement] = settlements_of(records)
    assert (settlement.version, settlement.last_event_id) == (1, event.event_id)


def _writes(result: Any) -> Writes:
    return Writes(states=result.states, outbox=result.settlements)


class WrappedStore:
    """The real store, with a hook a test overrides to act before each transaction."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def before_transact(self) -> None:
        pass

    async def before_fence(self, versions: Mapping[str, int]) -> None:
        pass

    @contextlib.asynccontextmanager
    async def fence(self, versions: Mapping[str, int]) -> AsyncIterator[set[str]]:
        await self.before_fence(versions)
        async with self.inner.fence(versions) as current:
            yield current

    async def transact(
        self,
        keys: Collection[str],
        update: Callable[[Mapping[str, InvoiceState]], W],
        published: Sequence[Published] = (),
    ) -> W:
        await self.before_transact()
        return await self.inner.transact(keys, update, published)

    async def unpublished(self) -> list[OutboxItem]:
        return await self.inner.unpublished()

    async def mark_published(self, published: Sequence[Published]) -> None:
        await self.inner.mark_published(published)

    async def get(self, key: str) -> InvoiceState | None:
        return await self.inner.get(key)

    async def close(self) -> None:
        await self.inner.close()


class FailingOnceStore(WrappedStore):
    """The real store, whose first transaction fails as a lost database connection would."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.failures = 0

    async def before_transact(self) -> None:
        if self.failures == 0:
            self.failures += 1
            raise ConnectionResetError("database connection lost")


async def test_a_failed_store_transaction_commits_nothing_and_the_batch_comes_again(
    consume_settings: Settings,
) -> None:
    s = consume_settings
    events = [bitfinex_event("f", n, payments=[(f"f{n}", "0.0001")]) for n in range(1, 4)]
    await produce(s, [event_record(e) for e in events])
    store = FailingOnceStore(await open_store(s.store_url))
    try:
        async with running_consumer(s, store) as consumer:
            records = await read_topic(
                s,
                s.settlements_topic,
                lambda rs: (
                    latest_settlements(rs).get("bitfinex:f") is not None
                    and latest_settlements(rs)["bitfinex:f"].paid_amount == Decimal("0.0003")
                ),
            )
            assert counter(consumer, "payhook_consumer_restarts_total") == 1
            assert counter(consumer, "payhook_consumer_events_total", outcome="processed") == 3
        assert store.failures == 1
        state = await store.get("bitfinex:f")
        assert state is not None
        assert len(state.facts) == 3
        assert all(s.paid_amount <= Decimal("0.0003") for s in settlements_of(records))
    finally:
        await store.close()


class TimedStore(WrappedStore):
    """The real store, noting when each transaction (one per batch) starts."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.starts: list[float] = []

    async def before_transact(self) -> None:
        self.starts.append(time.monotonic())


def timed_consumer(
    reads: list[float], fetches: list[float] | None = None
) -> type[AIOKafkaConsumer]:
    """The real Kafka consumer, noting when each read that returned records (a batch) ends:
    where the pipeline paces its batches, so what is timed is the pacing itself; and, given
    ``fetches``, when each fetch request is sent to the broker."""

    class TimedConsumer(AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if fetches is not None:
                send = self._client.send

                async def timed_send(node_id: int, request: Any, **options: Any) -> Any:
                    if type(request).__name__.startswith("FetchRequest"):
                        fetches.append(time.monotonic())
                    return await send(node_id, request, **options)

                self._client.send = timed_send

        async def getmany(self, *partitions: TopicPartition, **options: Any) -> Any:
            batch = await super().getmany(*partitions, **options)
            if batch:
                reads.append(time.monotonic())
            return batch

    return TimedConsumer


async def stream_steadily(
    s: Settings, consumer: Consumer, count: int, after_first: Callable[[], object] = list
) -> None:
    """Sends the first of ``count`` new events and waits for its batch (``after_first`` runs
    then), sends the others one every ms (a load, not a synchronization: several per batch
    interval), then waits until the consumer processed every one."""
    events = [bitfinex_event(f"s{n}", 1, payments=[(f"s{n}", "0.001")]) for n in range(count)]
    await produce(s, [event_record(events[0])])
    await wait_for(lambda: consumer.batches == 1, what="the first batch")
    after_first()
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for event in events[1:]:
            key, value, headers = event_record(event)
            await producer.send(s.events_topic, value, key=key, headers=headers)
            await asyncio.sleep(0.001)
        await producer.flush()
    finally:
        await producer.stop()
    await wait_for(
        lambda: counter(consumer, "payhook_consumer_events_total", outcome="processed") == count,
        what="every event",
    )


async def test_a_steady_stream_is_taken_in_batches_at_most_one_interval_apart(
    consume_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While records keep coming, the records of one interval make one batch (a store
    transaction, a publish, a commit), rather than a batch per fetch a few ms apart."""
    s = consume_settings
    reads: list[float] = []
    monkeypatch.setattr(supervisor, "AIOKafkaConsumer", timed_consumer(reads))
    # The pacing, at the interval of a busy stream (what interval the rate gives is a unit
    # test's business).
    monkeypatch.setattr(pipeline, "batch_interval", lambda rate: BATCH_INTERVAL)
    store = TimedStore(await open_store(s.store_url))
    count = 300
    marks: list[int] = []  # store transactions and reads before the stream
    try:
        async with running_consumer(s, store) as consumer:
            await stream_steadily(
                s, consumer, count, lambda: marks.extend((len(store.starts), len(reads)))
            )
        first, first_read = marks
        # A batch is read no sooner than the interval after the previous one ended, less the
        # fetch's lead (exactly: within the clock's resolution). Timed at the read, not at the
        # store transaction: on a loaded machine the decode between the two was once
        # preempted for 3 ms.
        gaps = [b - a for a, b in itertools.pairwise(reads[first_read:])]
        assert min(gaps) >= BATCH_INTERVAL - FETCH_LEAD - 1e-6, sorted(gaps)[:5]
        # One store transaction per batch, so far fewer than events.
        assert len(store.starts) - first < count / 2
    finally:
        await store.close()


async def test_between_the_batches_of_a_stream_nothing_is_fetched_until_the_next_is_due(
    consume_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka fetches again as soon as a batch is read and holds what that fetch brings until
    the next read: its records would wait a whole interval more. Paused in between, the
    partitions are fetched once the next batch is due, and that fetch brings the records of
    the whole interval."""
    s = consume_settings
    reads: list[float] = []
    fetches: list[float] = []
    monkeypatch.setattr(supervisor, "AIOKafkaConsumer", timed_consumer(reads, fetches))
    monkeypatch.setattr(pipeline, "batch_interval", lambda rate: BATCH_INTERVAL)
    first_read: list[int] = []
    async with running_consumer(s) as consumer:
        await stream_steadily(s, consumer, 200, lambda: first_read.append(len(reads)))
    streamed = reads[first_read[0] :]
    assert len(streamed) >= 5, streamed
    for read, next_read in itertools.pairwise(streamed):
        due = read + BATCH_INTERVAL - FETCH_LEAD - 1e-6
        early = [f for f in fetches if read < f < min(due, next_read)]
        assert not early, f"fetched {[round((f - read) * 1000, 2) for f in early]} ms after a read"


def counting_consumer(commits: list[dict[TopicPartition, int]]) -> type[AIOKafkaConsumer]:
    """The real Kafka consumer, noting the offsets of each commit."""

    class CountingConsumer(AIOKafkaConsumer):  # type: ignore[misc]
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            commits.append(dict(offsets))
            await super().commit(offsets)

    return CountingConsumer


async def test_a_busy_consumer_commits_on_a_cadence_and_an_idle_one_at_once(
    consume_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While records keep coming, the offsets of many batches go in one commit (at most one per
    COMMIT_INTERVAL, a broker request saved per batch); when they stop, the rest is committed
    without waiting for more records."""
    s = consume_settings
    commits: list[dict[TopicPartition, int]] = []
    monkeypatch.setattr(supervisor, "AIOKafkaConsumer", counting_consumer(commits))
    count = 300
    async with running_consumer(s) as consumer:
        await stream_steadily(s, consumer, count)

        # Idle now: everything is committed while the consumer still runs.
        def committed() -> int:
            latest: dict[TopicPartition, int] = {}
            for offsets in commits:
                latest.update(offsets)
            return sum(latest.values())

        await wait_for(lambda: committed() == count, what="the idle commit")
        batches = consumer.batches - 1
        assert sum((await committed_offsets(s)).values()) == count
    # Some commits carried several batches (committing every batch gives commits >= batches).
    # How many depends on the machine's pace (a slow batch can take a whole interval), so
    # the count is not pinned: under a loaded CI runner 11 commits for 14 batches was seen.
    assert len(commits) < batches, (len(commits), batches)


async def test_consumer_on_postgres(kafka_settings: Settings, postgres_url: str) -> None:
    s = consumer_settings(kafka_settings, store_url=postgres_url)
    events = [
        bitfinex_event("p", 1, status="pending", payments=[("p1", "0.0004")]),
        bitfinex_event("p", 2, payments=[("p1", "0.0004"), ("p1", "0.0004"), ("p2", "0.0007")]),
    ]
    await produce(s, [event_record(e) for e in [*events, events[0]]])
    async with running_consumer(s) as consumer:
        records = await read_topic(
            s,
            s.settlements_topic,
            lambda rs: (
                latest_settlements(rs).get("bitfinex:p") is not None
                and latest_settlements(rs)["bitfinex:p"].state == "overpaid"
            ),
        )
        await wait_for(
            lambda: counter(consumer, "payhook_consumer_events_total", outcome="duplicate") == 1
        )
    p = latest_settlements(records)["bitfinex:p"]
    assert (p.paid_amount, p.difference) == (Decimal("0.0011"), Decimal("0.0001"))
    assert [x.txid for x in p.payments] == ["p1", "p2"]


class HeldPublishStore(WrappedStore):
    """The real store; the publish of one invoice's settlement waits at the fence's door, and
    every later transaction with it, until the test lets it in (a consumer that stored a
    version, then stalled before publishing it)."""

    def __init__(self, inner: Store, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.at_door = asyncio.Event()
        self.let_in = asyncio.Event()

    async def before_fence(self, versions: Mapping[str, int]) -> None:
        if self.key in versions and not self.let_in.is_set():
            self.at_door.set()
            await self.let_in.wait()

    async def before_transact(self) -> None:
        # Stalled: the batches this consumer reads meanwhile wait too.
        if self.at_door.is_set():
            await self.let_in.wait()


async def test_two_consumers_racing_over_one_invoice_never_publish_an_older_version_last(
    kafka_settings: Settings, postgres_url: str
) -> None:
    """Two consumers (two groups: both read every event) share one PostgreSQL store. A stores
    version 1 of an invoice and stalls before publishing it. B starts: it publishes the
    outbox's version 1 (still the current one), skips that event (a duplicate), stores and
    publishes version 2. When A goes on, its version 1 is superseded and not published again
    after version 2: the compacted topic's last record of the invoice is version 2."""
    a_settings = consumer_settings(kafka_settings, store_url=postgres_url)
    b_settings = consumer_settings(
        kafka_settings, store_url=postgres_url, consumer_group=f"{a_settings.consumer_group}-b"
    )
    key = invoice_key("bitfinex", "race")
    first = bitfinex_event("race", 1, status="pending", payments=[("r1", "0.0005")])
    second = bitfinex_event("race", 2, payments=[("r1", "0.0005"), ("r2", "0.0005")])
    a_store = HeldPublishStore(await open_store(postgres_url), key)

    def has_version_2(rs: Records) -> bool:
        return any(s.invoice_id == "race" and s.version == 2 for s in settlements_of(rs))

    try:
        async with running_consumer(a_settings, a_store):
            try:
                await produce(a_settings, [event_record(first)])
                await asyncio.wait_for(a_store.at_door.wait(), 30)  # A stored version 1
                state = await a_store.get(key)
                assert state is not None
                assert state.settlement.version == 1
                async with running_consumer(b_settings) as b:
                    await produce(b_settings, [event_record(second)])
                    await read_topic(b_settings, b_settings.settlements_topic, has_version_2)
                    await wait_for(
                        lambda: (
                            counter(b, "payhook_consumer_events_total", outcome="duplicate") == 1
                        ),
                        what="B skipping the event A stored",
                    )
            finally:
                a_store.let_in.set()
            # A goes on: its stalled batch commits without publishing the superseded version,
            # and the next settlement A publishes comes after it on the topic.
            third = bitfinex_event("race-after", 1, payments=[("r3", "0.001")])
            await produce(a_settings, [event_record(third)])
            records = await read_topic(
                a_settings,
                a_settings.settlements_topic,
                lambda rs: any(r.key == b"bitfinex:race-after" for r in rs),
            )
        versions = [s.version for s in settlements_of(records) if s.invoice_id == "race"]
        assert versions == [1, 2]
        assert latest_settlements(records)[key].paid_amount == Decimal("0.001")
    finally:
        await a_store.close()


async def test_a_postgres_fence_holds_back_a_newer_version_until_the_publish_is_done(
    postgres_url: str,
) -> None:
    """While one consumer publishes version 1 inside the fence, another consumer's batch that
    would store version 2 waits for it (a row lock, seen in pg_locks); it stores version 2 once
    the fence is left."""
    stores = [await open_store(postgres_url), await open_store(postgres_url)]
    key = invoice_key("bitfinex", "fenced")
    try:

        def apply(*events: InvoiceEvent) -> Callable[[Mapping[str, InvoiceState]], Writes]:
            def update(states: Mapping[str, InvoiceState]) -> Writes:
                result = apply_batch(states, events, T0)
                return Writes(states=result.states, outbox=result.settlements)

            return update

        await stores[0].transact(
            [key], apply(bitfinex_event("fenced", 1, payments=[("f1", "0.001")]))
        )
        async with stores[0].fence({key: 1, "bitfinex:unknown": 1}) as current:
            assert current == {key, "bitfinex:unknown"}
            writer = asyncio.create_task(
                stores[1].transact(
                    [key], apply(bitfinex_event("fenced", 2, payments=[("f2", "0.001")]))
                )
            )
            conn = await asyncpg.connect(postgres_url)
            try:
                waiting = 0
                deadline = time.monotonic() + 10
                while not waiting:  # until the writer's FOR UPDATE waits on the fence's lock
                    assert not writer.done()
                    assert time.monotonic() < deadline, "the writer never waited on the fence"
                    waiting = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'tuple'"
                        " OR (NOT granted AND locktype = 'transactionid')"
                    )
            finally:
                await conn.close()
        writes = await asyncio.wait_for(writer, 10)
        assert writes.outbox[key].version == 2
        # Version 1 is superseded now: a late publisher of it is fenced out.
        async with stores[1].fence({key: 1}) as current:
            assert current == set()
        async with stores[1].fence({key: 2}) as current:
            assert current == {key}
    finally:
        for store in stores:
            await store.close()


class GatedStore(WrappedStore):
    """The real store, with a gate the test holds shut to freeze a batch mid-transaction."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def before_transact(self) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()


async def hold_a_batch(settings: Settings, store: GatedStore, event: InvoiceEvent) -> None:
    """Once the consumer on ``store`` has published one settlement, shuts the gate and produces
    ``event``; returns when its batch waits mid-transaction."""
    await read_topic(settings, settings.settlements_topic, lambda rs: len(rs) == 1)
    store.gate.clear()
    await produce(settings, [event_record(event)])
    await asyncio.wait_for(store.waiting.wait(), 30)


async def test_consumer_is_recreated_across_a_broker_restart(
    tmp_path: Path, consume_settings: Settings
) -> None:
    """The broker dies while a batch is in flight: the publish cannot finish, so the consumer
    stops making progress and is recreated until the broker is back. Tansu loses every record
    on restart; the settlement stored before the outage waits in the outbox and is published
    after it, and events produced after the restart are reconciled."""
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        s = dataclasses.replace(consume_settings, kafka_bootstrap=broker.bootstrap)
        store = GatedStore(await open_store(s.store_url))
        try:
            await produce(s, [event_record(bitfinex_event("g1", 1, payments=[("t1", "0.001")]))])
            async with running_consumer(s, store) as consumer:
                held = bitfinex_event("g2", 1, payments=[("t2", "0.001")])
                await hold_a_batch(s, store, held)
                broker.stop()
                store.gate.set()
                await wait_for(
                    lambda: counter(consumer, "payhook_consumer_restarts_total") >= 1,
                    what="the stalled consumer to be recreated",
                )
                assert not consumer.ready
                broker.start()
                await produce(s, [])  # topics first: a fresh Tansu drops records meanwhile
                after = bitfinex_event("g3", 1, payments=[("t3", "0.0015")])
                await produce(s, [event_record(after)])
                records = await read_topic(
                    s,
                    s.settlements_topic,
                    lambda rs: {"bitfinex:g2", "bitfinex:g3"} <= latest_settlements(rs).keys(),
                    within=60,
                )
                await wait_for(lambda: consumer.ready, what="readiness after the restart")
            latest = latest_settlements(records)
            assert latest["bitfinex:g2"].last_event_id == held.event_id
            assert (latest["bitfinex:g3"].state, latest["bitfinex:g3"].paid_amount) == (
                "overpaid",
                Decimal("0.0015"),
            )
            assert await store.unpublished() == []
        finally:
            await store.close()


async def test_an_idle_consumer_that_lost_the_broker_rereads_from_committed_offsets(
    tmp_path: Path, consume_settings: Settings
) -> None:
    """Nothing in flight when the broker dies, and it comes back empty (Tansu keeps nothing).
    The consumer must not resume from the positions it held in memory: the new log soon holds
    more records than it had read, and fetching from there would skip the first of them."""
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        s = dataclasses.replace(consume_settings, kafka_bootstrap=broker.bootstrap)
        before = [bitfinex_event(f"b{i}", 1, payments=[(f"tb{i}", "0.001")]) for i in range(40)]
        after = [bitfinex_event(f"a{i}", 1, payments=[(f"ta{i}", "0.002")]) for i in range(160)]
        await produce(s, [event_record(e) for e in before])
        async with running_consumer(s) as consumer:
            await read_topic(s, s.settlements_topic, lambda rs: len(rs) == len(before))
            broker.stop()
            await wait_for(
                lambda: counter(consumer, "payhook_consumer_restarts_total") >= 1,
                what="the idle consumer to notice the broker is gone",
            )
            broker.start()
            await produce(s, [])  # topics first: a fresh Tansu drops records meanwhile
            await produce(s, [event_record(e) for e in after])
            wanted = {f"bitfinex:{e.invoice_id}" for e in after}
            # Settlements published just before the outage may come again from the outbox.
            records = await read_topic(
                s,
                s.settlements_topic,
                lambda rs: wanted <= latest_settlements(rs).keys(),
                within=60,
            )
    latest = latest_settlements(records)
    assert all(latest[key].paid_amount == Decimal("0.002") for key in wanted)


# --- the process: probes, SIGTERM, SIGKILL ------------------------------------------------------

PAYHOOK = str(Path(sys.executable).with_name("payhook"))


def process_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "PAYHOOK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "PAYHOOK_TOPIC_PREFIX": settings.topic_prefix,
        "PAYHOOK_STORE_URL": settings.store_url,
        "PAYHOOK_CONSUMER_PORT": str(settings.consumer_port),
        "PAYHOOK_CONSUMER_GROUP": settings.consumer_group,
        "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS": str(settings.consumer_session_timeout_ms),
        "PAYHOOK_COMMIT_TIMEOUT": str(settings.commit_timeout),
        "PAYHOOK_SHUTDOWN_TIMEOUT": str(settings.shutdown_timeout),
        "PAYHOOK_LOG_FORMAT": "json",
    }


async def start_consume(settings: Settings, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            PAYHOOK,
            "consume",
            env=process_env(settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def probe(settings: Settings, path: str) -> int | None:
    """The status of GET ``path`` on the consumer port, or None when nothing answers."""
    url = f"http://127.0.0.1:{settings.consumer_port}{path}"
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            await response.read()
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def wait_probe(settings: Settings, path: str, status: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while await probe(settings, path) != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        await asyncio.sleep(0.05)


async def test_probes_and_readyz_turns_503_first_on_shutdown(consume_settings: Settings) -> None:
    s = consume_settings
    await produce(s, [event_record(bitfinex_event("pr", 1, payments=[("pr1", "0.001")]))])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(s, stop))
    try:
        await wait_probe(s, "/readyz", 200)
        assert await probe(s, "/healthz") == 200
        await read_topic(s, s.settlements_topic, lambda rs: len(rs) == 1)
        url = f"http://127.0.0.1:{s.consumer_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
            assert response.content_type == "text/plain"
        assert 'payhook_consumer_events_total{outcome="processed"} 1.0' in text
        assert 'payhook_settlements_total{state="paid"} 1.0' in text
        assert "payhook_consumer_batch_duration_seconds_bucket" in text
        assert "payhook_consumer_lag{" in text
        stop.set()
        # The consumer is still finishing and leaving its group: not ready any more.
        assert await probe(s, "/readyz") == 503
        assert await asyncio.wait_for(task, s.shutdown_timeout) == 0
    finally:
        stop.set()
        if not task.done():
            task.cancel()


async def test_sigterm_finishes_commits_and_exits_0(
    consume_settings: Settings, tmp_path: Path
) -> None:
    s = consume_settings
    events = [bitfinex_event(f"t{n}", 1, payments=[(f"t{n}", "0.001")]) for n in range(20)]
    await produce(s, [event_record(e) for e in events])
    log = tmp_path / "consume.log"
    process = await start_consume(s, log)
    try:
        await wait_probe(s, "/readyz", 200)
        await read_topic(s, s.settlements_topic, lambda rs: len(latest_settlements(rs)) == 20)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.wait_for(process.wait(), s.shutdown_timeout + 5) == 0
        assert time.monotonic() - started < s.shutdown_timeout
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert sum((await committed_offsets(s)).values()) == 20
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    names = [line.get("event") for line in lines]
    assert "batch" in names
    assert "shutdown_started" in names
    assert all("order-" not in json.dumps(line) for line in lines)  # no order ids logged


async def test_sigkill_mid_stream_then_restart_counts_every_payment_once(
    consume_settings: Settings, tmp_path: Path
) -> None:
    s = dataclasses.replace(consume_settings, consumer_batch_max=7)
    invoices = 30
    first = [
        bitfinex_event(f"k{n}", 1, status="pending", payments=[(f"k{n}a", "0.0004")])
        for n in range(invoices)
    ]
    second = [
        bitfinex_event(f"k{n}", 2, payments=[(f"k{n}a", "0.0004"), (f"k{n}b", "0.0005")])
        for n in range(invoices)
    ]
    await produce(s, [event_record(e) for e in first + second])
    log = tmp_path / "consume.log"
    process = await start_consume(s, log)
    try:
        await read_topic(s, s.settlements_topic, lambda rs: len(rs) >= 3)
    finally:
        process.kill()
        await process.wait()
    # Again, with repeats of everything, after the kill.
    await produce(s, [event_record(e) for e in first[:5] + second[:5]])
    process = await start_consume(s, log)
    try:
        records = await read_topic(
            s,
            s.settlements_topic,
            lambda rs: (
                len(latest_settlements(rs)) == invoices
                and all(x.state == "underpaid" for x in latest_settlements(rs).values())
            ),
            within=60,
        )
        await wait_probe(s, "/readyz", 200)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), s.shutdown_timeout + 5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    for settlement in latest_settlements(records).values():
        assert settlement.paid_amount == Decimal("0.0009")
        assert len(settlement.payments) == 2
        assert settlement.version <= 2
    store = await open_store(s.store_url)
    try:
        for n in range(invoices):
            state = await store.get(f"bitfinex:k{n}")
            assert state is not None
            ids = [f.event_id for f in state.facts]
            assert sorted(ids) == sorted({first[n].event_id, second[n].event_id})
        assert await store.unpublished() == []
    finally:
        await store.close()


async def test_consumer_is_recreated_when_the_broker_hangs(
    tmp_path: Path, consume_settings: Settings
) -> None:
    """A broker that stops answering (SIGSTOP: connections stay open, nothing comes back) is
    the case where an unbounded publish or commit would wait forever."""
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        s = dataclasses.replace(consume_settings, kafka_bootstrap=broker.bootstrap)
        assert broker._proc is not None
        pid = broker._proc.pid
        store = GatedStore(await open_store(s.store_url))
        try:
            await produce(s, [event_record(bitfinex_event("w1", 1, payments=[("w1", "0.001")]))])
            async with running_consumer(s, store) as consumer:
                held = bitfinex_event("w2", 1, payments=[("w2", "0.001")])
                await hold_a_batch(s, store, held)
                os.kill(pid, signal.SIGSTOP)
                try:
                    store.gate.set()
                    await wait_for(
                        lambda: counter(consumer, "payhook_consumer_restarts_total") >= 1,
                        what="the hung clients to be given up",
                    )
                finally:
                    os.kill(pid, signal.SIGCONT)
                records = await read_topic(
                    s,
                    s.settlements_topic,
                    lambda rs: "bitfinex:w2" in latest_settlements(rs),
                    within=60,
                )
                # The held record was never committed: it comes again, as a harmless duplicate.
                await wait_for(
                    lambda: (
                        counter(consumer, "payhook_consumer_events_total", outcome="duplicate") >= 1
                    ),
                    within=60,
                    what="the redelivered record",
                )
            assert latest_settlements(records)["bitfinex:w2"].version == 1
            state = await store.get("bitfinex:w2")
            assert state is not None
            assert [f.event_id for f in state.facts] == [held.event_id]
        finally:
            await store.close()
