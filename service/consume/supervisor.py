"""Keeps the consumer's Kafka clients alive: connects them (the settlement producer first, so
the outbox is published before any new batch), hands them to the batch pipeline, and throws
them away and recreates them when they stop making progress (a commit that does not return in
time: the local broker hangs commits after a restart; a broker that stops answering while idle)
or fail. Their records are then redelivered from the last commit, which event ids make
harmless. Readiness follows: ready while connected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final, final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from service.consume.metrics import ConsumerMetrics
from service.consume.pipeline import Pipeline, Stalled, bounded, retrieve
from service.kafka import cluster_answers, ensure_topics
from service.readiness import Readiness
from service.settings import Settings
from service.store import TRANSIENT_ERRORS, Store, open_store

log = structlog.get_logger("payhook.consume")

_RETRY_SECONDS: Final = 1.0
_CLOSE_SECONDS: Final = 2.0  # closing sockets and cancelling tasks: no broker round trip
FETCH_MAX_WAIT_MS: Final = 10


@final
class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Let the batches in flight be stored, published and committed before the partitions
        # move (bounded: a stuck commit is the stall detector's business).
        owner = self._owner
        await owner.pipeline.wait_inflight(owner.settings.commit_timeout)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self._owner.metrics.lag.remove(tp.topic, str(tp.partition))
        self._owner.assigned.clear()
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if assigned:
            self._owner.assigned.set()
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


@final
class Consumer:
    """The reconciling consumer. ``run(stop)`` until ``stop`` is set; then it finishes the batch
    in flight, commits, and closes everything it opened."""

    def __init__(
        self,
        settings: Settings,
        metrics: ConsumerMetrics | None = None,
        *,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ConsumerMetrics()
        self.readiness: Readiness = self.metrics.readiness
        self.pipeline = Pipeline(settings, self.metrics)
        self.assigned = asyncio.Event()
        self._store = store
        self._own_store = store is None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._leftovers: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def batches(self) -> int:
        return self.pipeline.batches

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("consumer not started")
        return self._store

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            if self._store is None:
                self._store = await open_store(self.settings.store_url)
            self.pipeline.store = self._store
            while not stop.is_set():
                try:
                    if not await self._connect_unless(stop):
                        break
                    log.info("consumer_connected")
                    self.readiness.set(True)
                    await self._consume(stop)
                except (KafkaError, Stalled, TimeoutError, *TRANSIENT_ERRORS) as exc:
                    self.readiness.set(False)
                    self.metrics.consumer_restarts.inc()
                    log.warning("consumer_restart", reason=type(exc).__name__, detail=str(exc))
                    await self._disconnect()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_RETRY_SECONDS):
                            await stop.wait()
        finally:
            self.readiness.set(False)
            await self._disconnect()
            await self._collect_leftovers()
            if self._store is not None:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self.store.mark_published(self.pipeline.take_published())
                if self._own_store:
                    await self._store.close()
                    self._store = None

    async def _connect_unless(self, stop: asyncio.Event) -> bool:
        """Connects, unless ``stop`` comes first (a shutdown never waits on a group join).

        The deadline does not rely on cancellation reaching the client code: a connect that
        swallowed it and hangs on is left behind, and the next attempt starts afresh."""
        settings = self.settings
        deadline = settings.commit_timeout * 3 + self._join_within() + 1
        connecting = asyncio.ensure_future(self._connect())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {connecting, stopping}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if connecting.done():
            connecting.result()
            return True
        connecting.cancel()
        self._leftovers.add(connecting)
        if stop.is_set():
            return False
        raise Stalled(f"connecting did not finish within {deadline:.0f}s")

    def _join_within(self) -> float:
        return max(30.0, 3 * self.settings.consumer_session_timeout_ms / 1000)

    async def _connect(self) -> None:
        """Nothing in connecting may hang (a broker that is half up must not stall us), but
        joining the group legitimately waits for the other members: up to a session timeout."""
        settings = self.settings
        async with asyncio.timeout(settings.commit_timeout * 3):
            await self._connect_producer()
        async with asyncio.timeout(self._join_within()):
            await self._connect_consumer()

    async def _connect_producer(self) -> None:
        settings = self.settings
        failed = {t: e for t, e in (await ensure_topics(settings)).items() if e is not None}
        if failed:
            raise KafkaError(f"topics not ready: {failed}")
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="payhook-consumer",
            acks="all",
            enable_idempotence=settings.kafka_idempotence,
            # A batch's settlements are handed over already packed per partition
            # (send_batched): lingering only delayed them.
            linger_ms=0,
            max_batch_size=512 * 1024,
            request_timeout_ms=int(settings.commit_timeout * 1000),
        )
        # Held before it starts: a start cut short (the connect deadline) leaves connections
        # that only its stop closes.
        self._producer = producer
        await producer.start()
        await self.pipeline.publish_outbox(producer)

    async def _connect_consumer(self) -> None:
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="payhook-consumer",
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.consumer_session_timeout_ms // 4),
            # How long the broker may hold a fetch that finds nothing new. Kafka answers as soon
            # as a record arrives, but the local broker holds it the whole time: at 100 ms that
            # was most of an event's 2xx -> settlement time (mixed benchmark at 200 webhooks/s:
            # p50 39 ms; 7-10 ms at 10 ms). An idle consumer's polling costs ~4% of a core
            # (1% at 100 ms); a busy one's fetches find records at once.
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        consumer.subscribe([settings.events_topic], listener=_Rebalance(self))
        self._consumer = consumer
        await consumer.start()

    async def _disconnect(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        timeout = self.settings.commit_timeout
        self.assigned.clear()
        for name, client in (("consumer", consumer), ("producer", producer)):
            if client is None:
                continue
            try:
                if not await bounded(_stop(client), timeout, self._leftovers):
                    log.warning("client_stop_unfinished", client=name)
            except (KafkaError, OSError) as exc:
                # A broken client may fail to stop cleanly; it is dropped all the same.
                log.warning("client_stop_failed", client=name, error=type(exc).__name__)
        finished = {task for task in self._leftovers if task.done()}
        self._leftovers -= finished
        for task in finished:
            retrieve(task)

    async def _collect_leftovers(self) -> None:
        """At exit: the stops given up on earlier get one more bounded chance, then go."""
        leftovers, self._leftovers = self._leftovers, set()
        if not leftovers:
            return
        _, pending = await asyncio.wait(leftovers, timeout=self.settings.commit_timeout)
        for task in pending:
            task.cancel()
        await asyncio.wait(leftovers)
        for task in leftovers:
            retrieve(task)

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer, producer = self._consumer, self._producer
        if consumer is None or producer is None:
            raise KafkaError("not connected")

        async def idle() -> None:
            await self._probe_broker(consumer)

        await self.pipeline.run(consumer, producer, stop, idle)

    async def _probe_broker(self, consumer: AIOKafkaConsumer) -> None:
        """While idle, checks that the broker still answers; a consumer that lost it is
        recreated rather than resumed. Its fetch positions live only in memory, and a broker
        that comes back without its log (the local memory broker after a restart; an unclean
        failover) would otherwise let it fetch from those stale positions and skip every record
        below them. A fresh consumer starts from the committed offsets: at worst it reads some
        records again, which event ids make harmless."""
        # The consumer exposes no client of its own; its metadata refresh goes through this one.
        if not await cluster_answers(consumer._client, self.settings.commit_timeout):
            raise Stalled("the broker stopped answering")


async def _stop(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """``client.stop()``; when that is given up on (cancelled), its connections are closed all
    the same. aiokafka's producer stop first waits for every queued batch to be delivered or to
    fail, which can outlast a broker outage (aio-libs/aiokafka#1101); a stop cancelled there
    (or in the consumer's group leave) has already marked itself closed and never reaches its
    client's close: the sockets were left to the garbage collector, an unclosed-socket
    ResourceWarning in whichever later test ran it."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        await _close_connections(client)
        raise


async def _close_connections(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """What aiokafka's stop does after its waits: the background tasks and the connections
    (private attributes of aiokafka 0.14; the connections first, so that the producer's sender,
    which awaits its in-flight requests when cancelled, finds them failed)."""
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        async with asyncio.timeout(_CLOSE_SECONDS):
            if isinstance(client, AIOKafkaProducer):
                await client.client.close()
                if client._sender is not None:
                    await client._sender.close()
            else:
                if client._fetcher is not None:
                    await client._fetcher.close()
                await client._client.close()
