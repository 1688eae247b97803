"""The consumer's batch pipeline: decode, validate, store, publish, commit.

Per batch: ``getmany`` -> decode and validate (undecodable or invalid records go to the DLQ)
-> one store transaction (dedupe by ``event_id``, reconcile, states + outbox) -> publish the
batch's new settlement versions (the latest per invoice) and DLQ records with ``acks=all`` ->
commit the offsets. While one batch is being published and committed the next is already read
and stored, and no third is read until the first is done; commits stay in batch order. The batch
size follows the load: the first record after a quiet moment is taken at once, and while records
keep coming a batch starts at most every :func:`batch_interval` after the previous one, taking
all that arrived meanwhile; that interval grows with the rate of records, from nothing at a
trickle to ``BATCH_INTERVAL`` when busy. Between the batches of a stream the partitions are
paused, so that the records of the interval wait at the broker and one fetch, made as the next
batch is due, brings them all.
Offsets are committed only after both the store transaction and the publish, so a crash
anywhere reprocesses the batch, and idempotency makes that harmless. While busy, the offsets
of the batches published since the last commit are committed together at most every
``COMMIT_INTERVAL``; when the records stop, at once. A settlement version stored but not
published when the process died waits in the outbox and is published at the next start
(:meth:`Pipeline.publish_outbox`).

The Kafka clients are given to it by :mod:`service.consume.supervisor`, which recreates them
when this raises :class:`Stalled` or a Kafka error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, final

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.amounts import PlainEncoder
from schemas.events import InvoiceEvent
from service.consume.metrics import ConsumerMetrics
from service.consume.reconcile import (
    BatchOutcome,
    InvalidEvent,
    InvoiceState,
    apply_batch,
    invoice_key,
    validate,
)
from service.kafka import send_batched
from service.settings import Settings
from service.store import DATA_ERRORS, Published, Store, Writes

log = structlog.get_logger("payhook.consume")

_decoder: Final = msgspec.json.Decoder(InvoiceEvent)
_encoder: Final = PlainEncoder()  # amounts in plain notation
# How often an idle consumer checks that the broker still answers (the supervisor's probe).
_PROBE_SECONDS: Final = 1.0
# While records keep coming, a batch starts at most this long after the previous one, so the
# records of that time make one batch: one store transaction, one fetch and one publish (each
# batch costs about 2 ms of the consumer's CPU whatever its size, and the local broker about
# 1 ms or more for the fetch: see bench.mixed). The interval grows with the rate of records and
# reaches this at BUSY_RATE; the first record after a quiet moment does not wait. Measured in
# bench.mixed (3 runs each): a fixed 5 ms gave 200/s its best time to settlement (p50 7.2-7.5
# ms against 10.1-10.6 at 10 ms) and 1,000/s its worst (p50 28-30 ms, answer p99 30-32 ms: the
# batches' CPU, the broker's mostly, crowds the webhooks out) where 10 ms gave 25-28 and 20-24.
BATCH_INTERVAL: Final = 0.010
BUSY_RATE: Final = 1000.0  # records/s
_RATE_WINDOW: Final = 0.5  # seconds of reads the rate is measured over
# Between two batches of a stream the partitions are paused and resumed this long before the
# next batch is due (about a fetch's round trip under load). Unpaused, aiokafka fetches as soon
# as a batch is read and holds what that fetch brings until the next read, fetching nothing
# more meanwhile: every record then waited a whole interval more (bench.mixed at 200/s, 2xx ->
# settlement p50 20 ms; 8-11 ms paused).
FETCH_LEAD: Final = 0.002
# While busy, offsets are committed at most this often, for the batches published since; when
# the records stop, at once. Each commit is a broker request (OffsetCommit), and the local
# broker's CPU is the stack's largest cost (833 us per webhook at 1,000/s in bench.mixed):
# committing every batch put a commit's round trip before each next batch's publish. Only
# offsets of batches already stored and published are committed, so a crash reprocesses at
# most this much more, which event ids make harmless.
COMMIT_INTERVAL: Final = 0.150
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


async def acked(futures: list[asyncio.Future[Any]], seconds: float) -> None:
    """Waits until the broker acknowledged every send; raises the first failure, or
    TimeoutError. Sends given up on may still fail later: their errors are seen, not leaked."""
    for future in futures:
        future.add_done_callback(retrieve)
    async with asyncio.timeout(seconds):
        await asyncio.gather(*futures)


async def bounded(
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


def _reason(exc: Exception) -> str:
    """The store's refusal, for a log line and a DLQ header (no record content beyond what the
    database quotes, bounded)."""
    return f"{type(exc).__name__}: {exc}"[:_DLQ_ERROR_MAX]


def batch_interval(rate: float) -> float:
    """How long after a batch the next one starts while records keep coming at ``rate`` a
    second: in proportion, up to ``BATCH_INTERVAL`` from ``BUSY_RATE``. A light load is not made
    to wait (CPU is plentiful then), a heavy one is taken in fewer, larger batches."""
    return min(BATCH_INTERVAL, max(0.0, rate) * BATCH_INTERVAL / BUSY_RATE)


@final
class _Rate:
    """Records read per second over the last ``_RATE_WINDOW``."""

    __slots__ = ("_reads", "_total")

    def __init__(self) -> None:
        self._reads: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, now: float, records: int) -> float:
        reads = self._reads
        reads.append((now, records))
        self._total += records
        while reads[0][0] < now - _RATE_WINDOW:
            self._total -= reads.popleft()[1]
        return self._total / _RATE_WINDOW


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a finished send's or background task's outcome as seen (what mattered was logged
    where it happened), so asyncio does not report it as never retrieved."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("background_task_failed", error=type(future.exception()).__name__)


@final
class Pipeline:
    """Batches through the store and out to Kafka, two in flight. One per consumer process;
    it outlives the Kafka clients (a settlement published but not yet marked so in the store is
    remembered across a reconnect)."""

    def __init__(self, settings: Settings, metrics: ConsumerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store: Store | None = None  # set by the supervisor once the store is open
        self.batch_lock = asyncio.Lock()
        self.batches = 0
        self._published: list[Published] = []
        self._inflight: asyncio.Task[None] | None = None
        # Offsets of batches stored and published, not yet committed (COMMIT_INTERVAL).
        self._durable: dict[TopicPartition, int] = {}
        self._committed_at = 0.0
        self._consumer: AIOKafkaConsumer | None = None

    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("consumer not started")
        return self.store

    def take_published(self) -> list[Published]:
        """The settlement versions published since the store last heard of it."""
        published, self._published = self._published, []
        return published

    async def wait_inflight(self, within: float) -> None:
        """Lets the batches in flight be stored, published and committed (before partitions
        move; bounded: a stuck commit is the supervisor's business)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                async with self.batch_lock:
                    if self._inflight is not None:
                        await asyncio.wait({self._inflight})
                    if self._consumer is not None:
                        await self._commit_durable(self._consumer)

    async def publish_outbox(self, producer: AIOKafkaProducer) -> None:
        """Publishes every settlement version stored but not yet published (after a crash)."""
        store = self._store()
        items = await store.unpublished()
        if not items:
            return
        # Fenced like a batch's publish: a version another consumer superseded meanwhile is
        # left to it.
        async with store.fence({i.key: i.version for i in items}) as current:
            futures = []
            for item in items:
                if item.key in current:
                    future = await producer.send(
                        self.settings.settlements_topic,
                        value=item.settlement,
                        key=item.key.encode(),
                    )
                    future.add_done_callback(retrieve)  # seen even if a later send raises
                    futures.append(future)
            await acked(futures, self.settings.commit_timeout)
        await store.mark_published([(i.key, i.version) for i in items if i.key in current])
        log.info("outbox_published", settlements=len(futures))

    async def run(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
        idle: Callable[[], Awaitable[None]],
    ) -> None:
        """Two stages in flight: while batch N is published and committed, batch N+1 is read,
        decoded and stored. Commits stay in batch order (each finish awaits the previous).
        ``idle`` runs about once a second while no record arrives (the supervisor's probe)."""
        probed = time.monotonic()
        next_batch = 0.0  # when the next batch may start; 0 while records do not keep coming
        rate = _Rate()
        # Offsets held for a new consumer's positions would be wrong: its records come again.
        self._durable = {}
        self._consumer = consumer
        try:
            while not stop.is_set():
                if next_batch:
                    await _sleep_until(next_batch - FETCH_LEAD)
                    consumer.resume(*consumer.paused())
                # While a batch is in flight or offsets wait for their commit, a read that
                # finds nothing returns soon, so that the commit of an idle moment is not late.
                waiting = self._inflight is not None or bool(self._durable)
                batch = await consumer.getmany(
                    timeout_ms=BATCH_INTERVAL * 1000 if waiting else 200,
                    max_records=self.settings.consumer_batch_max,
                )
                if batch:
                    now = time.monotonic()
                    per_second = rate.add(now, sum(map(len, batch.values())))
                    next_batch = now + batch_interval(per_second)
                    # Before the fetcher runs again: no fetch until the next batch is due.
                    consumer.pause(*consumer.assignment())
                else:
                    next_batch = 0.0
                if self._inflight is not None and self._inflight.done():
                    inflight, self._inflight = self._inflight, None
                    inflight.result()  # a failed publish or commit restarts the clients
                if not batch:
                    if self._inflight is None and self._durable:
                        await self._commit_durable(consumer)
                    if time.monotonic() - probed >= _PROBE_SECONDS:
                        await idle()
                        probed = time.monotonic()
                    continue
                async with self.batch_lock:
                    staged = await self._stage(batch)
                    previous = self._inflight
                    if previous is not None:
                        # One batch publishing and one stored, no more: the records arriving
                        # meanwhile make the next batch, larger the busier the consumer is. A
                        # chain of small batches, each waiting for the publish and commit of
                        # all before it, grew without bound when storing outpaced publishing.
                        await asyncio.wait({previous})
                    self._inflight = asyncio.create_task(
                        self._finish(consumer, producer, staged, previous)
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
            if self._durable and stop.is_set():
                try:
                    await self._commit_durable(consumer)
                except (Stalled, KafkaError) as exc:
                    # Uncommitted records come again at the next start, harmlessly.
                    log.warning("commit_unfinished", reason=type(exc).__name__)
            self._consumer = None

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
                history=result.versions,
                outcomes=result.outcomes,
                rejected=result.rejected,
            )

        keys = {invoice_key(e.provider, e.invoice_id) for e in events}
        published, self._published = self._published, []
        try:
            try:
                staged.writes = await self._store().transact(keys, update, published)
            except DATA_ERRORS as exc:
                # Some record holds what the store cannot take; the transaction rolled back
                # whole, so the batch goes again one record at a time to find it.
                log.warning("batch_refused_by_store", reason=_reason(exc), records=len(events))
                staged.writes, left = await self._one_by_one(events, now, published)
                self._published = list(left) + self._published
        except BaseException:
            # Still to be forgotten (forgetting twice is harmless).
            self._published = published + self._published
            raise
        for index, reason in staged.writes.rejected.items():
            tp, record = staged.sources[index]
            staged.poison.append((tp, record, reason))
        return staged

    async def _one_by_one(
        self, events: list[InvoiceEvent], now: datetime, published: Sequence[Published]
    ) -> tuple[_BatchWrites, Sequence[Published]]:
        """The batch's events each in its own transaction, in order, so each sees the state the
        one before it wrote: a record the store refuses for its data is rejected (to the DLQ
        with the store's reason), the others are applied exactly once. Returns the merged
        writes and the published entries no transaction took (all of them when none
        succeeded)."""
        merged = _BatchWrites()
        for index, event in enumerate(events):

            def update(
                states: Mapping[str, InvoiceState], event: InvoiceEvent = event
            ) -> _BatchWrites:
                result = apply_batch(states, [event], now)
                return _BatchWrites(
                    states=result.states,
                    outbox=result.settlements,
                    history=result.versions,
                    outcomes=result.outcomes,
                    rejected=result.rejected,
                )

            key = invoice_key(event.provider, event.invoice_id)
            try:
                one = await self._store().transact({key}, update, published)
            except DATA_ERRORS as exc:
                merged.outcomes.append("invalid")
                merged.rejected[index] = f"store refused: {_reason(exc)}"
                continue
            published = ()
            merged.outcomes += one.outcomes
            if 0 in one.rejected:
                merged.rejected[index] = one.rejected[0]
            merged.states.update(one.states)
            merged.outbox.update(one.outbox)
            merged.history += one.history
        return merged, published

    async def _finish(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        staged: _Staged,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Publishes the batch's DLQ records and settlements (acks=all), then commits."""
        if previous is not None:
            await previous
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
            future = await producer.send(
                settings.dlq_topic, value=record.value, key=record.key, headers=headers
            )
            # Seen at once, not only in acked(): a later send or the fence may raise first,
            # and this send, abandoned, then failed unseen ("Future exception was never
            # retrieved" when the broker was gone).
            future.add_done_callback(retrieve)
            futures.append(future)
        encode = _encoder.encode
        outbox = writes.outbox
        async with self._store().fence({k: s.version for k, s in outbox.items()}) as current:
            # Superseded: a later batch (this consumer's next, or another consumer's) stored a
            # newer version, and publishes it once this fence is left. Publishing this one
            # would put an older version after it on the compacted topic.
            for key in outbox.keys() - current:
                del outbox[key]
            futures += await send_batched(
                producer,
                settings.settlements_topic,
                ((key.encode(), encode(settlement), []) for key, settlement in outbox.items()),
            )
            await acked(futures, settings.commit_timeout)
        published_at = datetime.now(UTC)
        self._published.extend((k, s.version) for k, s in writes.outbox.items())

        offsets = {tp: records[-1].offset + 1 for tp, records in staged.batch.items() if records}
        self._durable.update(offsets)
        if time.monotonic() - self._committed_at >= COMMIT_INTERVAL:
            await self._commit_durable(consumer)
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
        for index, outcome in enumerate(writes.outcomes):
            if outcome == "duplicate":
                duplicates += 1
            elif outcome == "conflict":
                m.order_conflicts.labels(staged.events[index].provider).inc()
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

    async def _commit_durable(self, consumer: AIOKafkaConsumer) -> None:
        """Commits the offsets of the batches stored and published since the last commit."""
        offsets, self._durable = self._durable, {}
        if offsets:
            self._committed_at = time.monotonic()
            await self._commit(consumer, offsets)

    async def _commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> None:
        try:
            done = await bounded(consumer.commit(dict(offsets)), self.settings.commit_timeout)
        except CommitFailedError:
            # The group rebalanced: these records will be redelivered, harmlessly.
            log.warning("commit_failed_rebalanced")
            return
        if not done:
            raise Stalled(f"commit did not return within {self.settings.commit_timeout}s")
