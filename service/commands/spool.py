"""``payhook spool status`` and ``payhook spool drain``.

``status`` reads a spool directory without its lock and without writing (beside a running
``serve`` too): depth, bytes, the oldest record's age, and whether a live process holds it.

``drain`` empties a spool a stopped ``serve`` left behind (the volume of a removed pod) into
the events topic: it takes the spool's lock (refused while a live ``serve`` holds it), sends its
records oldest first with ``acks=all`` and acknowledges each batch in the spool only once Kafka
acknowledged it. Killed in between, the next drain sends that batch again (the same bytes, the
same ``event_id``, which the consumer drops); nothing is skipped. With Kafka unreachable nothing
is acknowledged and the spool stays as it was.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Final

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from service.commands import CommandFailed
from service.commands.broker import require_topics, unreachable
from service.kafka import send_batched
from service.settings import Settings

_BATCH: Final = 500
_CONNECT_WITHIN: Final = 10.0


def status(directory: Path, *, as_json: bool) -> int:
    """Prints the spool's status; 0 whenever it can be read, whatever its depth."""
    # Inside the command: a shared module loads a process's package only when it runs.
    from service.ingest.spool import inspect

    if not directory.is_dir():
        raise CommandFailed(
            f"no spool directory at {directory} (give DIR, or set PAYHOOK_SPOOL_DIR)"
        )
    try:
        found = inspect(directory)
    except OSError as exc:
        raise CommandFailed(
            f"cannot read the spool at {directory}: {exc.strerror or exc}"
        ) from None
    if as_json:
        sys.stdout.write(msgspec.json.encode(found).decode() + "\n")
    else:
        held = "held by a live process" if found.locked else "not held by any process"
        print(
            f"{found.directory}: {found.depth} records, {found.bytes} bytes, "
            f"oldest {found.oldest_age_seconds:.1f} s, {held}"
        )
    sys.stdout.flush()
    return 0


async def _producer(settings: Settings) -> AIOKafkaProducer:
    await require_topics(settings, _CONNECT_WITHIN)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="payhook-spool-drain",
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        request_timeout_ms=int(max(settings.publish_timeout, 5.0) * 1000),
    )
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise unreachable(settings, type(exc).__name__) from None
    return producer


async def _drain(settings: Settings, directory: Path) -> tuple[int, int]:
    """(records sent, records left)."""
    from service.ingest.spool import Spool, SpoolLocked

    spool = Spool(directory, settings.spool_max_bytes)
    try:
        await spool.start()
    except SpoolLocked:
        raise CommandFailed(
            f"the spool {directory} is held by a live process (a running serve drains its own "
            "spool): stop it first, or leave it to drain"
        ) from None
    sent = 0
    try:
        if spool.depth == 0:
            return 0, 0
        producer = await _producer(settings)
        try:
            while spool.depth:
                events = await spool.read(_BATCH)
                try:
                    async with asyncio.timeout(max(settings.publish_timeout, 5.0) * 2):
                        deliveries = await send_batched(
                            producer,
                            settings.events_topic,
                            ((e.key, e.value, list(e.headers)) for e in events),
                        )
                        for outcome in await asyncio.gather(*deliveries, return_exceptions=True):
                            if isinstance(outcome, BaseException):
                                raise outcome
                except (TimeoutError, KafkaError) as exc:
                    raise CommandFailed(
                        f"Kafka at {settings.kafka_bootstrap} did not acknowledge "
                        f"({type(exc).__name__}); {sent} records sent, {spool.depth} left in "
                        f"{directory}: run the drain again"
                    ) from None
                await spool.ack(len(events))
                sent += len(events)
                print(f"sent {sent}, {spool.depth} left", flush=True)
        finally:
            await producer.stop()
        return sent, spool.depth
    finally:
        await spool.close()


def drain(settings: Settings, directory: Path) -> int:
    """Drains the spool into Kafka; 0 only when it is empty afterwards."""
    if not directory.is_dir():
        raise CommandFailed(f"no spool directory at {directory}")
    sent, left = asyncio.run(_drain(settings, directory))
    print(f"{directory}: {sent} records sent to {settings.events_topic}, {left} left")
    return 0 if left == 0 else 1
