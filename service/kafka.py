"""What both processes need from Kafka: record keys, headers and encoding, the default
partitioner, record batches, a cluster probe and topic creation.

Ingest's producer (:mod:`service.ingest.publisher`) and the consumer's settlement and DLQ
producer both pack their records here, so an invoice's records land on the partition Java's
and aiokafka's default partitioner gives its key, and per-invoice order holds end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from murmurhash2 import murmurhash2

from schemas.amounts import PlainEncoder
from schemas.events import InvoiceEvent
from service.settings import Settings

# Tansu's own default; keys (provider:invoice) spread over them, order kept per invoice.
TOPIC_PARTITIONS: Final = 4
_TOPIC_ALREADY_EXISTS: Final = 36

# Amounts in plain notation (``1E-8`` written ``0.00000001``).
_ENCODER: Final = PlainEncoder()
# Kafka's murmur2 is MurmurHash2 with this seed (org.apache.kafka.common.utils.Utils.murmur2).
_MURMUR2_SEED: Final = 0x9747B28C


def event_key(event: InvoiceEvent) -> bytes:
    return f"{event.provider}:{event.invoice_id}".encode()


def event_headers(event: InvoiceEvent) -> list[tuple[str, bytes]]:
    return [("event-id", event.event_id.encode()), ("provider", event.provider.encode())]


def encode_event(event: InvoiceEvent) -> bytes:
    return _ENCODER.encode(event)


# aiokafka's batch builder takes headers as a list, nothing else.
Headers = list[tuple[str, bytes]]
Record = tuple[bytes, bytes, Headers]  # key, value, headers
T = TypeVar("T")


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's (and Java's) default partitioner picks for ``key`` among
    ``partitions`` sorted by id."""
    hashed = murmurhash2(key, _MURMUR2_SEED)
    return partitions[(hashed & 0x7FFFFFFF) % len(partitions)]


def pack_batches(
    producer: AIOKafkaProducer,
    partitions: Sequence[int],
    items: Iterable[T],
    record_of: Callable[[T], Record],
) -> list[tuple[int, BatchBuilder, list[T]]]:
    """Packs the items' records, in order, into one record batch per partition (and another
    when one fills up), on the partition the default partitioner gives the key, so per-key
    order holds: (partition, batch, the items in it). A future per batch, not per record."""
    batches: list[tuple[int, BatchBuilder, list[T]]] = []
    open_batches: dict[int, tuple[int, BatchBuilder, list[T]]] = {}
    for item in items:
        key, value, headers = record_of(item)
        partition = partition_for(key, partitions)
        batch = open_batches.get(partition)
        if (
            batch is None
            or batch[1].append(timestamp=None, key=key, value=value, headers=headers) is None
        ):
            batch = open_batches[partition] = (partition, producer.create_batch(), [])
            batches.append(batch)
            # An empty batch takes any record.
            batch[1].append(timestamp=None, key=key, value=value, headers=headers)
        batch[2].append(item)
    return batches


async def send_batched(
    producer: AIOKafkaProducer, topic: str, records: Iterable[Record]
) -> list[asyncio.Future[Any]]:
    """Queues keyed records in batches (:func:`pack_batches`); a delivery future per batch."""
    partitions = sorted(await producer.partitions_for(topic))
    return [
        await producer.send_batch(builder, topic, partition=partition)
        for partition, builder, _ in pack_batches(producer, partitions, records, _itself)
    ]


def _itself(record: Record) -> Record:
    return record


async def cluster_answers(client: Any, within: float) -> bool:
    """Whether Kafka answers a metadata request through ``client`` (an AIOKafkaClient) now."""
    try:
        async with asyncio.timeout(within):
            await client.fetch_all_metadata()
    except (TimeoutError, KafkaError, OSError):
        return False
    return True


async def ensure_topics(settings: Settings, within: float = 10.0) -> dict[str, str | None]:
    """Creates the topics that are missing: topic -> error message, or None when it exists
    now. A broker that cannot be reached is an error for every topic."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="payhook-admin",
        request_timeout_ms=int(within * 1000),
    )
    try:
        async with asyncio.timeout(within):
            await admin.start()
            cluster = await admin.describe_cluster()
            replication = min(3, max(1, len(cluster["brokers"])))
            response = await admin.create_topics(
                [NewTopic(t, TOPIC_PARTITIONS, replication) for t in settings.topics]
            )
    except (TimeoutError, KafkaError) as exc:
        reason = f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}"
        return dict.fromkeys(settings.topics, reason)
    finally:
        await admin.close()
    results: dict[str, str | None] = {}
    for topic, code, message, *_ in response.topic_errors:
        if code in (0, _TOPIC_ALREADY_EXISTS):
            results[topic] = None
        else:
            results[topic] = message or f"error code {code}"
    return results
