"""Topic settings: what payhook sends when it creates its topics, and what it reports (never
changes) on topics that exist with other settings.

Against the local Tansu broker: it stores the configs a topic is created with and answers
DescribeConfigs with them, so what was sent is read back; it does not act on them (memory
storage, no compaction, no replication), which only Apache Kafka can show (README).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import given
from hypothesis import strategies as st

from service.cli import main
from service.kafka import TopicSpec, ensure_topics, spec_drift, topic_drift, topic_specs
from service.settings import Settings, SettingsError, load_settings
from tests.fixtures_kafka import TEST_ENV

DAY_MS = 24 * 3600 * 1000


def settings(**env: str) -> Settings:
    return load_settings({**TEST_ENV, **env})


def test_defaults_follow_the_contract() -> None:
    s = settings()
    assert (s.topic_partitions, s.topic_replication, s.events_retention_ms) == (
        4,
        None,
        30 * DAY_MS,
    )


def test_topic_settings_are_read_and_checked() -> None:
    s = settings(
        PAYHOOK_TOPIC_PARTITIONS="12",
        PAYHOOK_TOPIC_REPLICATION="3",
        PAYHOOK_EVENTS_RETENTION_MS="604800000",
    )
    assert (s.topic_partitions, s.topic_replication, s.events_retention_ms) == (12, 3, 7 * DAY_MS)
    assert settings(PAYHOOK_EVENTS_RETENTION_MS="-1").events_retention_ms == -1  # forever
    for name, value in [
        ("PAYHOOK_TOPIC_REPLICATION", "0"),
        ("PAYHOOK_TOPIC_PARTITIONS", "0"),
        ("PAYHOOK_EVENTS_RETENTION_MS", "0"),
        ("PAYHOOK_EVENTS_RETENTION_MS", "-2"),
        ("PAYHOOK_EVENTS_RETENTION_MS", "30d"),
    ]:
        with pytest.raises(SettingsError, match=name):
            settings(**{name: value})


def by_topic(specs: list[TopicSpec]) -> dict[str, TopicSpec]:
    return {spec.name.split(".", 1)[1]: spec for spec in specs}


def test_events_and_dlq_are_kept_settlements_compacted() -> None:
    specs = by_topic(topic_specs(settings(PAYHOOK_EVENTS_RETENTION_MS="604800000"), brokers=5))
    for name in ("invoice-events.v1", "invoice-events.dlq.v1"):
        assert specs[name].configs == {
            "cleanup.policy": "delete",
            "retention.ms": "604800000",
            "min.insync.replicas": "2",
        }
    assert specs["settlements.v1"].configs == {
        "cleanup.policy": "compact",
        "min.insync.replicas": "2",
    }
    assert {(s.partitions, s.replication) for s in specs.values()} == {(4, 3)}


@given(brokers=st.integers(1, 12), configured=st.one_of(st.none(), st.integers(1, 7)))
def test_replication_and_min_insync_replicas(brokers: int, configured: int | None) -> None:
    s = dataclasses.replace(settings(), topic_replication=configured)
    for spec in topic_specs(s, brokers):
        replication = configured if configured is not None else min(3, brokers)
        assert spec.replication == replication
        min_isr = int(spec.configs["min.insync.replicas"])
        # acks=all survives one broker from replication 3 on, and a write never needs more
        # in-sync replicas than there are replicas minus one
        assert min_isr == (2 if replication >= 3 else 1)
        assert min_isr <= max(1, replication - 1)


def test_drift_names_every_difference() -> None:
    spec = TopicSpec("t", 4, 3, {"cleanup.policy": "compact", "min.insync.replicas": "2"})
    assert spec_drift(spec, 4, 3, {"cleanup.policy": "compact", "min.insync.replicas": "2"}) == []
    assert spec_drift(spec, 8, 1, {"cleanup.policy": "delete"}) == [
        "cleanup.policy is delete, expected compact",
        "min.insync.replicas is None, expected 2",
        "8 partitions, expected 4 (never changed)",
        "replication 1, expected 3",
    ]


async def described(s: Settings, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        (answer,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        ((_, _, _, name, entries),) = answer.resources
        assert name == topic
        return {entry[0]: entry[1] for entry in entries}
    finally:
        await admin.close()


async def test_topics_are_created_with_their_settings(kafka_settings: Settings) -> None:
    s = dataclasses.replace(kafka_settings, events_retention_ms=7 * DAY_MS, topic_partitions=3)
    assert await ensure_topics(s) == dict.fromkeys(s.topics)
    assert await described(s, s.events_topic) == {
        "cleanup.policy": "delete",
        "retention.ms": str(7 * DAY_MS),
        "min.insync.replicas": "1",  # one broker: replication 1
    }
    assert (await described(s, s.settlements_topic))["cleanup.policy"] == "compact"
    assert (await described(s, s.dlq_topic))["retention.ms"] == str(7 * DAY_MS)
    assert await topic_drift(s) == {}


async def test_existing_topics_with_other_settings_are_reported_not_changed(
    kafka_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = kafka_settings
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        # created by someone else: settlements not compacted, events kept a day, 2 partitions
        await admin.create_topics(
            [
                NewTopic(s.events_topic, 2, 1, topic_configs={"retention.ms": str(DAY_MS)}),
                NewTopic(s.settlements_topic, 4, 1, topic_configs={"cleanup.policy": "delete"}),
            ]
        )
    finally:
        await admin.close()
    assert await ensure_topics(s) == dict.fromkeys(s.topics)  # exists: fine
    drift = await topic_drift(s)
    assert drift == {
        s.events_topic: [
            "cleanup.policy is None, expected delete",
            f"retention.ms is {DAY_MS}, expected {30 * DAY_MS}",
            "min.insync.replicas is None, expected 1",
            "2 partitions, expected 4 (never changed)",
        ],
        s.settlements_topic: [
            "cleanup.policy is delete, expected compact",
            "min.insync.replicas is None, expected 1",
        ],
    }
    # nothing was changed
    assert await described(s, s.settlements_topic) == {"cleanup.policy": "delete"}

    monkeypatch.setenv("PAYHOOK_KAFKA_BOOTSTRAP", s.kafka_bootstrap)
    monkeypatch.setenv("PAYHOOK_TOPIC_PREFIX", s.topic_prefix)
    # the command runs its own event loop: off this one
    assert await asyncio.to_thread(main, ["topics"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{t}: ok" for t in s.topics]
    assert err.splitlines() == [
        f"{s.events_topic}: settings differ (left unchanged): " + "; ".join(drift[s.events_topic]),
        f"{s.settlements_topic}: settings differ (left unchanged): "
        + "; ".join(drift[s.settlements_topic]),
    ]
