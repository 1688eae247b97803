"""``payhook dlq list`` and ``payhook dlq redrive``: the records the consumer could not process.

Both read the DLQ topic from its start to its end (a snapshot: what fails again while a redrive
runs lands after it and waits for the next one). ``redrive`` puts each record past the position
of the consumer group ``payhook-dlq-redrive`` back onto the events topic, with its original key
and bytes, its original headers and ``redriven-from`` = ``partition:offset``, and commits the
position only after Kafka acknowledged the batch (``acks=all``). So a record is redriven once;
killed mid-way, a record may be sent again (the same bytes, the same ``event_id``, which the
consumer drops) but none is skipped. A redriven record that fails again goes back to the DLQ
with its new reason: that is the consumer's normal path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final, TypeAlias

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from service.commands import CommandFailed
from service.commands.broker import require_topics, unreachable
from service.settings import Settings

REDRIVE_GROUP: Final = "payhook-dlq-redrive"
REDRIVEN_FROM: Final = "redriven-from"
# Headers the consumer adds when it dead-letters a record; a redriven record goes without them.
_DLQ_HEADERS: Final = frozenset(
    {"error", "source-topic", "source-partition", "source-offset", REDRIVEN_FROM}
)
_BATCH: Final = 100
_WITHIN: Final = 10.0  # a broker call that takes longer is a broker that does not answer
_QUIET_POLLS: Final = 3  # empty fetches at the end offsets: the end of the topic
_MAX_QUIET_POLLS: Final = 20  # empty fetches below them: give up waiting for more

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class DlqRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A DLQ record as ``dlq list --json`` prints it."""

    partition: int
    offset: int
    key: str | None
    error: str | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    event_id: str | None
    redriven_from: str | None  # set when this record is a redriven one that failed again
    redriven: bool  # already put back onto the events topic by `dlq redrive`


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def describe(record: Record, redriven: bool) -> DlqRecord:
    headers = {name: _text(value) for name, value in record.headers or ()}
    return DlqRecord(
        partition=record.partition,
        offset=record.offset,
        key=_text(record.key),
        error=headers.get("error"),
        source_topic=headers.get("source-topic"),
        source_partition=_int(headers.get("source-partition")),
        source_offset=_int(headers.get("source-offset")),
        event_id=headers.get("event-id"),
        redriven_from=headers.get(REDRIVEN_FROM),
        redriven=redriven,
    )


def redriven_headers(record: Record) -> list[tuple[str, bytes]]:
    """The record's own headers, without the DLQ's, and where it is redriven from."""
    kept = [(name, value) for name, value in record.headers or () if name not in _DLQ_HEADERS]
    return [*kept, (REDRIVEN_FROM, f"{record.partition}:{record.offset}".encode())]


@contextlib.asynccontextmanager
async def _dlq_reader(
    settings: Settings,
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer of the DLQ topic's partitions, assigned (no group join), that commits and
    reads the redrive group's positions."""
    await require_topics(settings, _WITHIN)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="payhook-dlq",
        group_id=REDRIVE_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        request_timeout_ms=int(_WITHIN * 1000),
    )
    try:
        async with asyncio.timeout(_WITHIN):
            await consumer.start()
            partitions: set[int] = set()
            while not partitions:
                partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
                if not partitions:
                    await consumer._client.force_metadata_update()
    except (KafkaError, TimeoutError) as exc:
        await consumer.stop()
        raise unreachable(settings, type(exc).__name__) from None
    tps = [TopicPartition(settings.dlq_topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    try:
        yield consumer, tps
    finally:
        await consumer.stop()


async def _positions(
    settings: Settings, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The redrive group's committed position of each partition (0 when none)."""
    try:
        async with asyncio.timeout(_WITHIN):
            return {tp: (await consumer.committed(tp)) or 0 for tp in tps}
    except (KafkaError, TimeoutError) as exc:
        raise unreachable(settings, type(exc).__name__) from None


async def _read_all(
    settings: Settings, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> list[Record]:
    """Every record of the DLQ from the start, oldest first per partition.

    The end: every partition at or past its end offset and a few fetches in a row that bring
    nothing (some brokers, the local Tansu among them, report an end offset short of the last
    record batch, so the offsets alone cannot say it)."""
    records: list[Record] = []
    try:
        async with asyncio.timeout(_WITHIN):
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(list(tps))
        quiet = 0
        deadline = time.monotonic() + 300
        while quiet < _MAX_QUIET_POLLS and time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=200, max_records=1000)
            if batch:
                quiet = 0
                for part in batch.values():
                    records.extend(part)
                continue
            quiet += 1
            if quiet >= _QUIET_POLLS and await _at_ends(consumer, ends):
                break
    except (KafkaError, TimeoutError) as exc:
        raise unreachable(settings, type(exc).__name__) from None
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


async def _at_ends(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


def list_records(settings: Settings, *, as_json: bool) -> int:
    """``dlq list``: a line (or JSON object) per DLQ record."""

    async def listing() -> list[DlqRecord]:
        async with _dlq_reader(settings) as (consumer, tps):
            positions = await _positions(settings, consumer, tps)
            records = await _read_all(settings, consumer, tps)
        return [
            describe(r, r.offset < positions[TopicPartition(r.topic, r.partition)]) for r in records
        ]

    found = asyncio.run(listing())
    out = sys.stdout
    for record in found:
        if as_json:
            out.write(msgspec.json.encode(record).decode() + "\n")
        else:
            mark = "  (redriven)" if record.redriven else ""
            out.write(
                f"{record.partition}:{record.offset}  key={record.key}  "
                f"error={record.error}{mark}\n"
            )
    if not as_json:
        waiting = sum(not r.redriven for r in found)
        out.write(f"{len(found)} records in {settings.dlq_topic}, {waiting} not redriven yet\n")
    out.flush()
    return 0


async def _send(settings: Settings, producer: AIOKafkaProducer, records: Sequence[Record]) -> None:
    futures = [
        await producer.send(
            settings.events_topic,
            value=record.value,
            key=record.key,
            headers=redriven_headers(record),
        )
        for record in records
    ]
    async with asyncio.timeout(_WITHIN * 3):
        for outcome in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome


def redrive(settings: Settings, *, dry_run: bool) -> int:
    """``dlq redrive [--dry-run]``."""

    async def redriving() -> int:
        async with _dlq_reader(settings) as (consumer, tps):
            positions = await _positions(settings, consumer, tps)
            pending = [
                r
                for r in await _read_all(settings, consumer, tps)
                if r.offset >= positions[TopicPartition(r.topic, r.partition)]
            ]
            verb = "would redrive" if dry_run else "redriven"
            if dry_run or not pending:
                for r in pending:
                    error = describe(r, False).error
                    print(f"{verb} {r.partition}:{r.offset}  key={_text(r.key)}  error={error}")
                return len(pending)
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                client_id="payhook-dlq-redrive",
                acks="all",
                enable_idempotence=settings.kafka_idempotence,
                request_timeout_ms=int(_WITHIN * 1000),
            )
            try:
                async with asyncio.timeout(_WITHIN):
                    await producer.start()
            except (KafkaError, TimeoutError) as exc:
                await producer.stop()
                raise unreachable(settings, type(exc).__name__) from None
            done = 0
            try:
                for start in range(0, len(pending), _BATCH):
                    chunk = pending[start : start + _BATCH]
                    try:
                        await _send(settings, producer, chunk)
                        # Only now: a crash before this line sends the chunk again, never skips it.
                        offsets = {
                            TopicPartition(r.topic, r.partition): r.offset + 1 for r in chunk
                        }
                        async with asyncio.timeout(_WITHIN):
                            await consumer.commit(offsets)
                    except (KafkaError, TimeoutError) as exc:
                        raise CommandFailed(
                            f"Kafka at {settings.kafka_bootstrap} failed ({type(exc).__name__}) "
                            f"after {done} of {len(pending)} records: run the redrive again"
                        ) from None
                    done += len(chunk)
                    for r in chunk:
                        print(f"{verb} {r.partition}:{r.offset}  key={_text(r.key)}", flush=True)
            finally:
                await producer.stop()
            return done

    moved = asyncio.run(redriving())
    if dry_run:
        print(f"{moved} records would be redriven to {settings.events_topic}")
    else:
        print(f"{moved} records redriven to {settings.events_topic} (group {REDRIVE_GROUP})")
    sys.stdout.flush()
    return 0
