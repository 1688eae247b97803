"""What both processes need from Kafka: record keys, headers and encoding, the default
partitioner, record batches, a cluster probe and topic creation.

Topic settings (DESIGN.md): the events and DLQ topics keep ``PAYHOOK_EVENTS_RETENTION_MS``
(the store can be rebuilt by replaying them), the settlements topic is compacted (its last
record of every key is the invoice's latest version); replication ``PAYHOOK_TOPIC_REPLICATION``
(default min(3, brokers)) with ``min.insync.replicas`` 2 from replication 3, so that an event
acknowledged with ``acks=all`` survives the loss of a broker. They are set at creation only: an
existing topic whose settings differ is reported (:func:`topic_drift`), never changed.

Ingest's producer (:mod:`service.ingest.publisher`) and the consumer's settlement and DLQ
producer both pack their records here, so an invoice's records land on the partition Java's
and aiokafka's default partitioner gives its key, and per-invoice order holds end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, final

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from murmurhash2 import murmurhash2

from schemas.amounts import PlainEncoder
from schemas.events import InvoiceEvent
from service.settings import Settings

# The default of PAYHOOK_TOPIC_PARTITIONS; keys (provider:invoice) spread over them, order
# kept per invoice.
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
    """Queues keyed records in batches (:func:`pack_batches`); a delivery future per batch.

    Each future's failure is marked seen as it is queued: when a later batch's send raises,
    the caller never gets the earlier ones, and aiokafka leaves an explicit batch's failure to
    its caller (asyncio then logged "Future exception was never retrieved")."""
    partitions = sorted(await producer.partitions_for(topic))
    futures: list[asyncio.Future[Any]] = []
    for partition, builder, _ in pack_batches(producer, partitions, records, _itself):
        future = await producer.send_batch(builder, topic, partition=partition)
        future.add_done_callback(_seen)
        futures.append(future)
    return futures


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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


@final
@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How payhook creates one topic."""

    name: str
    partitions: int
    replication: int
    configs: Mapping[str, str]


def topic_specs(settings: Settings, brokers: int) -> list[TopicSpec]:
    """The three topics with their settings, for a cluster of ``brokers`` brokers."""
    replication = settings.topic_replication or min(3, max(1, brokers))
    durability = {"min.insync.replicas": "2" if replication >= 3 else "1"}
    kept = {
        "cleanup.policy": "delete",
        "retention.ms": str(settings.events_retention_ms),
        **durability,
    }
    compacted = {"cleanup.policy": "compact", **durability}
    configs = {
        settings.events_topic: kept,
        settings.settlements_topic: compacted,
        settings.dlq_topic: kept,
    }
    return [
        TopicSpec(topic, settings.topic_partitions, replication, configs[topic])
        for topic in settings.topics
    ]


def spec_drift(
    spec: TopicSpec, partitions: int, replication: int, configs: Mapping[str, str | None]
) -> list[str]:
    """How an existing topic differs from ``spec``: one phrase per setting, empty when none.
    A config the broker does not report (None, or absent) differs too."""
    drift = [
        f"{name} is {configs.get(name)}, expected {want}"
        for name, want in spec.configs.items()
        if configs.get(name) != want
    ]
    if partitions != spec.partitions:
        drift.append(f"{partitions} partitions, expected {spec.partitions} (never changed)")
    if replication != spec.replication:
        drift.append(f"replication {replication}, expected {spec.replication}")
    return drift


def _admin(settings: Settings, within: float) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="payhook-admin",
        request_timeout_ms=int(within * 1000),
    )


def _unreachable(settings: Settings, exc: BaseException) -> str:
    return f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}"


async def ensure_topics(settings: Settings, within: float = 10.0) -> dict[str, str | None]:
    """Creates the topics that are missing, with their settings (:func:`topic_specs`): topic ->
    error message, or None when it exists now. A broker that cannot be reached is an error for
    every topic. An existing topic is left as it is (see :func:`topic_drift`)."""
    admin = _admin(settings, within)
    try:
        async with asyncio.timeout(within):
            await admin.start()
            cluster = await admin.describe_cluster()
            specs = topic_specs(settings, len(cluster["brokers"]))
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication, topic_configs=dict(s.configs))
                    for s in specs
                ]
            )
    except (TimeoutError, KafkaError) as exc:
        return dict.fromkeys(settings.topics, _unreachable(settings, exc))
    finally:
        await admin.close()
    results: dict[str, str | None] = {}
    for topic, code, message, *_ in response.topic_errors:
        if code in (0, _TOPIC_ALREADY_EXISTS):
            results[topic] = None
        else:
            results[topic] = message or f"error code {code}"
    return results


async def topic_drift(settings: Settings, within: float = 10.0) -> dict[str, list[str]]:
    """Existing topics whose partitions, replication or configs differ from what payhook
    would create: topic -> differences (absent topics and matching ones are left out). Raises
    KafkaError or TimeoutError when Kafka does not answer."""
    admin = _admin(settings, within)
    try:
        async with asyncio.timeout(within):
            await admin.start()
            cluster = await admin.describe_cluster()
            specs = topic_specs(settings, len(cluster["brokers"]))
            described = await admin.describe_topics([s.name for s in specs])
            layout = {
                t["topic"]: (len(t["partitions"]), len(t["partitions"][0]["replicas"]))
                for t in described
                if t["error_code"] == 0 and t["partitions"]
            }
            existing = [s for s in specs if s.name in layout]
            answers = (
                await admin.describe_configs(
                    [
                        # all of them (Tansu drops a filtered request); compared below
                        ConfigResource(ConfigResourceType.TOPIC, s.name)
                        for s in existing
                    ]
                )
                if existing
                else []
            )
    finally:
        await admin.close()
    configs: dict[str, dict[str, str | None]] = {}
    for answer in answers:
        for _code, _message, _type, name, entries in answer.resources:
            configs[name] = {entry[0]: entry[1] for entry in entries}
    drift: dict[str, list[str]] = {}
    for spec in existing:
        partitions, replication = layout[spec.name]
        found = spec_drift(spec, partitions, replication, configs.get(spec.name, {}))
        if found:
            drift[spec.name] = found
    return drift
