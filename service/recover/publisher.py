"""Publishing what a sweep recovered: its own producer, ``acks=all``, connected on first use."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final, final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.events import InvoiceEvent
from service.kafka import encode_event, ensure_topics, event_headers, event_key
from service.recover.sweep import PublishFailed
from service.settings import Settings

_CLIENT_ID: Final = "payhook-recover"


@final
class EventPublisher:
    """Publishes recovered events with ``acks=all``; connects on first use, so a sweep still
    reads (and reports) while Kafka is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        problem = (await ensure_topics(self._settings)).get(self._settings.events_topic)
        if problem is not None:
            raise PublishFailed(problem)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=self._settings.kafka_idempotence,
            client_id=_CLIENT_ID,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise PublishFailed(f"Kafka unreachable ({type(exc).__name__})") from None
        self._producer = producer
        return producer

    async def publish(self, events: Sequence[InvoiceEvent]) -> None:
        producer = await self._started()
        topic = self._settings.events_topic
        try:
            async with asyncio.timeout(self._settings.commit_timeout):
                futures = [
                    await producer.send(
                        topic, value=encode_event(e), key=event_key(e), headers=event_headers(e)
                    )
                    for e in events
                ]
                results = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError:
            raise PublishFailed(
                f"not acknowledged within {self._settings.commit_timeout:g} s"
            ) from None
        except KafkaError as exc:
            raise PublishFailed(type(exc).__name__) from None
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise PublishFailed(f"{len(errors)} not acknowledged ({type(errors[0]).__name__})")

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
