"""Running the reconciling consumer against the real broker, and reading what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

# Imported here, at plugin load, on purpose: CPython 3.11.7 (gh-106905) raises "AST constructor
# recursion depth mismatch" when pytest's assertion rewriter parses a module from a deep stack,
# as hypothesis' own plugin does when it first imports hypothesis in the terminal summary of a
# run that collected no hypothesis test.
import hypothesis  # noqa: F401
import msgspec
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from jsonschema import Draft202012Validator

from devtools.devbroker import free_port
from schemas.events import InvoiceEvent, Settlement
from schemas.generate import HERE as SCHEMAS
from service.consume.supervisor import Consumer
from service.kafka import encode_event, ensure_topics, event_headers, event_key
from service.settings import Settings
from service.store import Store

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
Records = list[ConsumerRecord[bytes, bytes]]


def consumer_settings(settings: Settings, **overrides: Any) -> Settings:
    """Short timeouts so that group joins and stall detection are quick in tests."""
    fields: dict[str, Any] = {
        "consumer_group": f"{settings.topic_prefix}-consumer",
        "consumer_session_timeout_ms": 6000,
        "commit_timeout": 3.0,
        "consumer_port": free_port(),
        "shutdown_timeout": 15.0,
    }
    fields.update(overrides)
    return dataclasses.replace(settings, **fields)


@pytest.fixture
def consume_settings(kafka_settings: Settings) -> Settings:
    return consumer_settings(kafka_settings)


def event_record(event: InvoiceEvent) -> Record:
    return event_key(event), encode_event(event), event_headers(event)


async def produce(settings: Settings, records: Sequence[Record], topic: str | None = None) -> None:
    """Writes records to the events topic (or ``topic``) with ``acks=all``."""
    errors = await ensure_topics(settings)
    assert all(e is None for e in errors.values()), errors
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(
                topic or settings.events_topic, value=value, key=key, headers=headers
            )
    finally:
        await producer.stop()


async def read_topic(
    settings: Settings,
    topic: str,
    until: Callable[[Records], bool],
    within: float = 30.0,
) -> Records:
    """Reads ``topic`` from the start until ``until(records so far)`` holds; fails on timeout."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await reader.start()
    records: Records = []
    try:
        partitions = reader.partitions_for_topic(topic)
        deadline = time.monotonic() + within
        while not partitions:
            await reader._client.force_metadata_update()
            partitions = reader.partitions_for_topic(topic)
            assert time.monotonic() < deadline, f"topic {topic} does not exist"
        reader.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await reader.seek_to_beginning()
        while not until(records):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"gave up waiting on {topic}: {len(records)} records"
            batch = await reader.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await reader.stop()


def schema_validator(name: str) -> Draft202012Validator:
    """A standard validator of one generated JSON Schema, format checking on (date-time)."""
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate_records(records: Records, schema: str) -> None:
    """Every record's JSON validates against ``schema`` (a generated file's name)."""
    validator = schema_validator(schema)
    for record in records:
        validator.validate(orjson.loads(record.value))


def settlements_of(records: Records) -> list[Settlement]:
    return [msgspec.json.decode(r.value, type=Settlement) for r in records]


def latest_settlements(records: Records) -> dict[str, Settlement]:
    latest: dict[str, Settlement] = {}
    for s in settlements_of(records):
        key = f"{s.provider}:{s.invoice_id}"
        if key not in latest or s.version > latest[key].version:
            latest[key] = s
    return latest


async def wait_for(predicate: Callable[[], bool], within: float = 30.0, what: str = "") -> None:
    """Waits until ``predicate()`` holds, checking on every loop turn a few times a second."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.05)


def counter(consumer: Consumer, name: str, **labels: str) -> float:
    value = consumer.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_consumer(
    settings: Settings, store: Store | None = None
) -> AsyncIterator[Consumer]:
    """A consumer running in this event loop until the block ends (then it stops cleanly)."""
    consumer = Consumer(settings, store=store)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        async with asyncio.timeout(settings.shutdown_timeout):
            await task
