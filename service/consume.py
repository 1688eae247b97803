"""``payhook consume``: invoice events in, settlements out.

Per batch: ``getmany`` -> decode and validate (undecodable or invalid records go to the DLQ)
-> one store transaction (dedupe by ``event_id``, reconcile, states + outbox) -> publish the
batch's new settlement versions (the latest per invoice) and DLQ records with ``acks=all`` ->
commit the offsets. While one batch is being published and committed the next is already read
and stored; commits stay in batch order. Offsets are committed only after both the store
transaction and the publish, so a crash anywhere reprocesses the batch, and idempotency makes
that harmless. A settlement version stored but not published when the process died waits in the
outbox and is published at the next start.

Kafka clients that stop making progress (a commit that does not return in time: the local
broker hangs commits after a restart) or fail are thrown away and recreated; their records are
redelivered from the last commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, final

import msgspec
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.events import InvoiceEvent
from service.metrics import CONTENT_TYPE, ConsumerMetrics
from service.publish import cluster_answers, ensure_topics, send_batched
from service.reconcile import (
    BatchOutcome,
    InvalidEvent,
    InvoiceState,
    apply_batch,
    invoice_key,
    validate,
)
from service.settings import Settings
from service.store import TRANSIENT_ERRORS, Published, Store, Writes, open_store
from service.tasks import cancel_and_wait

log = structlog.get_logger("payhook.consume")

_decoder: Final = msgspec.json.Decoder(InvoiceEvent)
_encoder: Final = msgspec.json.Encoder()
_RETRY_SECONDS: Final = 1.0
# How often an idle consumer checks that the broker still answers (see _probe_broker).
_PROBE_SECONDS: Final = 1.0
_DLQ_ERROR_MAX: Final = 500  # header bytes: msgspec's message names the field, that is enough


class Stalled(RuntimeError):
    """The Kafka consumer stopped making progress (a commit did not return in time)."""


@dataclass(slots=True)
class _BatchWrites(Writes):
    outcomes: list[BatchOutcome] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


Poison = tuple[TopicPartition, "ConsumerRecord[bytes, bytes]", str]


@final
@dataclass(slots=True)
class _Staged:
    """A batch that is stored and waits for its publish and commit."""

    batch: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]
    started: float
    records: int = 0
    events: list[InvoiceEvent] = field(default_factory=list)
    sources: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = field(default_factory=list)
    poison: list[Poison] = field(default_factory=list)
    writes: _BatchWrites = field(default_factory=_BatchWrites)


@final
class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Let the batches in flight be stored, published and committed before the partitions
        # move (bounded: a stuck commit is the stall detector's business).
        owner = self._owner
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(owner.settings.commit_timeout):
                async with owner.batch_lock:
                    if owner._inflight is not None:
                        await asyncio.wait({owner._inflight})
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self._owner.metrics.lag.remove(tp.topic, str(tp.partition))
        self._owner.assigned.clear()
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if assigned:
            self._owner.assigned.set()
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


async def _acked(futures: list[asyncio.Future[Any]], seconds: float) -> None:
    """Waits until the broker acknowledged every send; raises the first failure, or
    TimeoutError. Sends given up on may still fail later: their errors are seen, not leaked."""
    for future in futures:
        future.add_done_callback(_retrieve)
    async with asyncio.timeout(seconds):
        await asyncio.gather(*futures)


async def _bounded(
    awaitable: Awaitable[Any], seconds: float, leftovers: set[asyncio.Task[Any]] | None = None
) -> bool:
    """Waits at most ``seconds``; True when done. A call still hanging then is cancelled, or,
    given ``leftovers``, left to finish in the background (a client's ``stop`` that completes
    once the broker answers again) and collected there."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        if leftovers is None:
            task.cancel()
        else:
            leftovers.add(task)
        return False
    if task.cancelled():
        # Cancelled from inside the client (aiokafka's stop can end so): not our cancellation,
        # and not done either.
        return False
    task.result()
    return True


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a finished send's or background task's outcome as seen (what mattered was logged
    where it happened), so asyncio does not report it as never retrieved."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("background_task_failed", error=type(future.exception()).__name__)


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
        self.batch_lock = asyncio.Lock()
        self.assigned = asyncio.Event()
        self.ready = False
        self._store = store
        self._own_store = store is None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._published: list[Published] = []
        self._inflight: asyncio.Task[None] | None = None
        self._leftovers: set[asyncio.Task[Any]] = set()
        self.batches = 0

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
            while not stop.is_set():
                try:
                    if not await self._connect_unless(stop):
                        break
                    log.info("consumer_connected")
                    self.ready = True
                    self.metrics.ready.set(1)
                    await self._consume(stop)
                except (KafkaError, Stalled, TimeoutError, *TRANSIENT_ERRORS) as exc:
                    self.ready = False
                    self.metrics.ready.set(0)
                    self.metrics.consumer_restarts.inc()
                    log.warning("consumer_restart", reason=type(exc).__name__, detail=str(exc))
                    await self._disconnect()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_RETRY_SECONDS):
                            await stop.wait()
        finally:
            self.ready = False
            self.metrics.ready.set(0)
            await self._disconnect()
            await self._collect_leftovers()
            if self._store is not None:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self.store.mark_published(self._published)
                self._published = []
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
            linger_ms=5,
            max_batch_size=512 * 1024,
            request_timeout_ms=int(settings.commit_timeout * 1000),
        )
        await producer.start()
        self._producer = producer
        await self._publish_outbox()

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
            fetch_max_wait_ms=100,
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
                if not await _bounded(client.stop(), timeout, self._leftovers):
                    log.warning("client_stop_unfinished", client=name)
            except (KafkaError, OSError) as exc:
                # A broken client may fail to stop cleanly; it is dropped all the same.
                log.warning("client_stop_failed", client=name, error=type(exc).__name__)
        finished = {task for task in self._leftovers if task.done()}
        self._leftovers -= finished
        for task in finished:
            _retrieve(task)

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
            _retrieve(task)

    async def _publish_outbox(self) -> None:
        """Publishes every settlement version stored but not yet published (after a crash)."""
        items = await self.store.unpublished()
        if not items:
            return
        producer = self._require_producer()
        futures = [
            await producer.send(
                self.settings.settlements_topic, value=item.settlement, key=item.key.encode()
            )
            for item in items
        ]
        await _acked(futures, self.settings.commit_timeout)
        await self.store.mark_published([(i.key, i.version) for i in items])
        log.info("outbox_published", settlements=len(items))

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise KafkaError("producer not connected")
        return self._producer

    # --- the loop -----------------------------------------------------------------------------

    async def _consume(self, stop: asyncio.Event) -> None:
        """Two stages in flight: while batch N is published and committed, batch N+1 is read,
        decoded and stored. Commits stay in batch order (each finish awaits the previous)."""
        consumer = self._consumer
        assert consumer is not None
        probed = time.monotonic()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=200, max_records=self.settings.consumer_batch_max
                )
                if self._inflight is not None and self._inflight.done():
                    inflight, self._inflight = self._inflight, None
                    inflight.result()  # a failed publish or commit restarts the clients
                if not batch:
                    if time.monotonic() - probed >= _PROBE_SECONDS:
                        await self._probe_broker(consumer)
                        probed = time.monotonic()
                    continue
                async with self.batch_lock:
                    staged = await self._stage(batch)
                    self._inflight = asyncio.create_task(
                        self._finish(consumer, staged, self._inflight)
                    )
        finally:
            last, self._inflight = self._inflight, None
            if last is not None:
                # Let the batch already stored finish its publish and commit (the graceful
                # path); when it fails, the outbox and redelivery cover it.
                await asyncio.wait({last})
                error = None if last.cancelled() else last.exception()
                if error is not None:
                    log.warning("batch_unfinished", reason=type(error).__name__)

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

    async def _stage(
        self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]
    ) -> _Staged:
        """Decodes and validates the records and runs the batch's store transaction."""
        staged = _Staged(batch=batch, started=time.perf_counter())
        decode = _decoder.decode
        events = staged.events
        for tp, records in batch.items():
            staged.records += len(records)
            for record in records:
                try:
                    if record.value is None:
                        raise InvalidEvent("record has no value")
                    event = decode(record.value)
                    validate(event, record.key)
                except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                    staged.poison.append((tp, record, f"undecodable: {exc}"))
                except InvalidEvent as exc:
                    staged.poison.append((tp, record, f"invalid: {exc}"))
                else:
                    events.append(event)
                    staged.sources.append((tp, record))

        now = datetime.now(UTC)

        def update(states: Mapping[str, InvoiceState]) -> _BatchWrites:
            result = apply_batch(states, events, now)
            return _BatchWrites(
                states=result.states,
                outbox=result.settlements,
                outcomes=result.outcomes,
                rejected=result.rejected,
            )

        keys = {invoice_key(e.provider, e.invoice_id) for e in events}
        published, self._published = self._published, []
        try:
            staged.writes = await self.store.transact(keys, update, published)
        except BaseException:
            self._published = published + self._published  # still to be forgotten
            raise
        for index, reason in staged.writes.rejected.items():
            tp, record = staged.sources[index]
            staged.poison.append((tp, record, reason))
        return staged

    async def _finish(
        self,
        consumer: AIOKafkaConsumer,
        staged: _Staged,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Publishes the batch's DLQ records and settlements (acks=all), then commits."""
        if previous is not None:
            await previous
        producer = self._require_producer()
        settings = self.settings
        writes = staged.writes
        futures = []
        for tp, record, reason in staged.poison:
            headers = [
                *(record.headers or ()),
                ("error", reason[:_DLQ_ERROR_MAX].encode()),
                ("source-topic", tp.topic.encode()),
                ("source-partition", str(tp.partition).encode()),
                ("source-offset", str(record.offset).encode()),
            ]
            futures.append(
                await producer.send(
                    settings.dlq_topic, value=record.value, key=record.key, headers=headers
                )
            )
        encode = _encoder.encode
        futures += await send_batched(
            producer,
            settings.settlements_topic,
            ((key.encode(), encode(settlement), []) for key, settlement in writes.outbox.items()),
        )
        await _acked(futures, settings.commit_timeout)
        published_at = datetime.now(UTC)
        self._published.extend((k, s.version) for k, s in writes.outbox.items())

        offsets = {tp: records[-1].offset + 1 for tp, records in staged.batch.items() if records}
        await self._commit(consumer, offsets)
        self._observe(consumer, staged, offsets, published_at)

    def _observe(
        self,
        consumer: AIOKafkaConsumer,
        staged: _Staged,
        offsets: Mapping[TopicPartition, int],
        published_at: datetime,
    ) -> None:
        """Metrics and the summary line, once everything is durable."""
        writes = staged.writes
        m = self.metrics
        processed = duplicates = 0
        for outcome in writes.outcomes:
            if outcome == "duplicate":
                duplicates += 1
            elif outcome != "invalid":
                processed += 1
        m.events.labels("processed").inc(processed)
        m.events.labels("duplicate").inc(duplicates)
        m.events.labels("dlq").inc(len(staged.poison))
        received = {e.event_id: e.received_at for e in staged.events}
        by_state: dict[str, int] = {}
        for settlement in writes.outbox.values():
            by_state[settlement.state] = by_state.get(settlement.state, 0) + 1
            if settlement.discrepancy:
                m.discrepancies.labels(settlement.provider).inc()
            at = received.get(settlement.last_event_id)
            if at is not None:
                m.e2e_latency.observe(max(0.0, (published_at - at).total_seconds()))
        for state, count in by_state.items():
            m.settlements.labels(state).inc(count)
        for tp, next_offset in offsets.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                m.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))
        duration = time.perf_counter() - staged.started
        m.batch_duration.observe(duration)
        self.batches += 1
        log.info(
            "batch",
            records=staged.records,
            processed=processed,
            duplicates=duplicates,
            dlq=len(staged.poison),
            settlements=len(writes.outbox),
            duration_ms=round(duration * 1000, 1),
        )

    async def _commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> None:
        try:
            done = await _bounded(consumer.commit(dict(offsets)), self.settings.commit_timeout)
        except CommitFailedError:
            # The group rebalanced: these records will be redelivered, harmlessly.
            log.warning("commit_failed_rebalanced")
            return
        if not done:
            raise Stalled(f"commit did not return within {self.settings.commit_timeout}s")


# --- probes and the process -------------------------------------------------------------------

CONSUMER_KEY: Final = web.AppKey("consumer", Consumer)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[CONSUMER_KEY].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[CONSUMER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def create_probe_app(consumer: Consumer) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` of the consumer."""
    app = web.Application()
    app[CONSUMER_KEY] = consumer
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Runs the consumer and its probes until ``stop``; 0 after a clean finish."""
    consumer = Consumer(settings)
    runner = web.AppRunner(create_probe_app(consumer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.consumer_port)
    await site.start()
    task = asyncio.create_task(consumer.run(stop))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            # Stopped on its own: a fatal error (the store cannot be opened, say).
            exc = task.exception()
            log.error("consumer_failed", error=type(exc).__name__, detail=str(exc))
            return 1
        consumer.ready = False  # /readyz answers 503 from the first moment of shutdown
        consumer.metrics.ready.set(0)
        log.info("shutdown_started")
        if not await _bounded(asyncio.shield(task), settings.shutdown_timeout):
            log.error("shutdown_timeout", seconds=settings.shutdown_timeout)
            task.cancel()
            return 1
        return 0
    finally:
        stopping.cancel()
        await cancel_and_wait(task)
        await runner.cleanup()


async def _main(settings: Settings) -> int:
    # Everything alive after start-up (modules, settings) lives as long as the process: keep
    # the collector from rescanning it with every batch's garbage.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings, stop)


def run(settings: Settings) -> int:
    """``payhook consume``: blocks until SIGTERM/SIGINT, then finishes the batch in flight,
    commits and exits (0 when that took less than ``shutdown_timeout``)."""
    from service.logs import configure_logging

    configure_logging(settings.log_format)
    return asyncio.run(_main(settings))


if __name__ == "__main__":
    import sys

    from service.settings import load_settings

    sys.exit(run(load_settings(require_signing_keys=False)))
