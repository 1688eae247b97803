"""Nothing acknowledged is lost: the spool during outages, start-up drain, late duplicates,
graceful SIGTERM. Against real Tansu brokers of our own (the session broker is shared)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession
from aiokafka import ConsumerRecord

from devtools.devbroker import LocalBroker, free_port
from schemas.events import InvoiceEvent
from service.consume.reconcile import apply_batch
from service.ingest.app import METRICS, SPOOL
from service.ingest.metrics import IngestMetrics
from service.ingest.spool import Spool, SpooledEvent
from service.kafka import encode_event, event_headers, event_key
from service.providers.bitfinex import BITFINEX
from service.settings import Settings
from tests.fixtures_app import ClientFactory, bitfinex, encode, read_records, token_for
from tests.fixtures_kafka import TEST_ENV, SettingsFactory

DECODE_EVENT = msgspec.json.Decoder(InvoiceEvent)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker this test may stop, freeze and restart."""
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        yield broker


def freeze(broker: LocalBroker) -> None:
    """SIGSTOP: connections stay open, nothing is answered (a send hangs, then lands later)."""
    assert broker._proc is not None
    os.kill(broker._proc.pid, signal.SIGSTOP)


def thaw(broker: LocalBroker) -> None:
    assert broker._proc is not None
    os.kill(broker._proc.pid, signal.SIGCONT)


def webhook(order: str, status: str = "COMPLETED", invoice: str | None = None) -> bytes:
    return encode(bitfinex(orderId=order, id=invoice or f"inv-{order}", status=status))


async def post(client: Any, settings: Settings, order: str, body: bytes) -> Any:
    token = token_for(settings, "bitfinex", order)
    return await client.post(
        f"/v1/webhooks/bitfinex/{order}",
        params={"token": token},
        data=body,
        headers={"Content-Type": "application/json"},
    )


def event_ids(records: list[ConsumerRecord[bytes, bytes]]) -> list[str]:
    return [dict(r.headers)["event-id"].decode() for r in records]


async def read_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[str]], bool],
    within: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Re-reads the topic from the start until ``done(event ids in order)`` holds."""
    async with asyncio.timeout(within):
        count = 1
        while True:
            records = await read_records(bootstrap, topic, count, within)
            if done(event_ids(records)):
                return records
            count = len(records) + 1


def distinct(ids: list[str]) -> list[str]:
    return [i for n, i in enumerate(ids) if i not in ids[:n]]


async def test_outage_spools_in_order_and_drains_after_restart(
    own_broker: LocalBroker, settings_factory: SettingsFactory, app_client: ClientFactory
) -> None:
    settings = settings_factory(kafka_bootstrap=own_broker.bootstrap, publish_timeout=0.5)
    client = await app_client(settings)
    spool = client.app[SPOOL]
    metrics: IngestMetrics = client.app[METRICS]
    own_broker.stop()

    # Same invoice, so one partition: Kafka must see them in the order they were accepted.
    first = await post(client, settings, "o-1", webhook("o-1", "PENDING", "inv-1"))
    assert first.status == 200, await first.text()
    assert spool.depth == 1
    second = await post(client, settings, "o-1", webhook("o-1", "COMPLETED", "inv-1"))
    assert second.status == 200
    assert spool.depth == 2  # queued behind the first, not sent past it
    accepted = [(await first.json())["event_id"], (await second.json())["event_id"]]
    assert len(set(accepted)) == 2
    ready = await client.get("/readyz")
    assert ready.status == 200  # Kafka is down, but the spool has room
    assert metrics.registry.get_sample_value("payhook_spool_depth") == 2

    own_broker.start()  # an empty broker on the same port: topics and records gone
    await asyncio.wait_for(spool.wait_empty(), 30)
    # The producer may also deliver the first send it had abandoned: a duplicate, never a gap.
    records = await read_until(
        own_broker.bootstrap, settings.events_topic, lambda ids: len(set(ids)) == 2
    )
    assert distinct(event_ids(records)) == accepted
    assert metrics.registry.get_sample_value("payhook_spool_drained_events_total") == 2
    assert metrics.registry.get_sample_value("payhook_spool_depth") == 0


async def test_late_delivery_duplicate_is_absorbed_downstream(
    own_broker: LocalBroker, settings_factory: SettingsFactory, app_client: ClientFactory
) -> None:
    settings = settings_factory(kafka_bootstrap=own_broker.bootstrap, publish_timeout=0.5)
    client = await app_client(settings)
    freeze(own_broker)
    try:
        response = await post(client, settings, "o-2", webhook("o-2"))
        assert response.status == 200  # timed out on Kafka, fsynced to the spool
    finally:
        thaw(own_broker)
    event_id = (await response.json())["event_id"]
    # The abandoned send lands once the broker wakes, and the drainer sends the spooled copy.
    records = await read_records(own_broker.bootstrap, settings.events_topic, 2)
    assert event_ids(records) == [event_id, event_id]
    assert records[0].value == records[1].value
    assert records[0].key == records[1].key == b"bitfinex:inv-o-2"
    events = [DECODE_EVENT.decode(r.value) for r in records if r.value is not None]
    result = apply_batch({}, events, datetime.now(UTC))
    assert result.outcomes == ["changed", "duplicate"]
    assert [s.version for s in result.settlements.values()] == [1]


async def test_full_spool_answers_503_and_not_ready(
    settings_factory: SettingsFactory, app_client: ClientFactory, unreachable: str
) -> None:
    settings = settings_factory(kafka_bootstrap=unreachable, publish_timeout=0.3, spool_max_bytes=1)
    client = await app_client(settings)
    response = await post(client, settings, "o-3", webhook("o-3"))
    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()
    assert (await response.json())["error"] == "unavailable"
    ready = await client.get("/readyz")
    assert ready.status == 503


async def test_startup_drains_what_a_previous_process_left(
    kafka_settings: Settings, app_client: ClientFactory
) -> None:
    body = webhook("o-4")
    event = BITFINEX.normalize(BITFINEX.decode(body), datetime.now(UTC))
    async with Spool(kafka_settings.spool_dir, kafka_settings.spool_max_bytes) as left:
        await left.append(
            SpooledEvent(
                key=event_key(event),
                value=encode_event(event),
                headers=tuple(event_headers(event)),
                spooled_at=0.0,
            )
        )
    client = await app_client(kafka_settings)
    await asyncio.wait_for(client.app[SPOOL].wait_empty(), 30)
    records = await read_records(kafka_settings.kafka_bootstrap, kafka_settings.events_topic, 1)
    assert event_ids(records) == [event.event_id]


# --- payhook serve as a process: SIGTERM ------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


def serve_env(settings: Settings, port: int) -> dict[str, str]:
    return {
        **os.environ,
        **TEST_ENV,
        "PAYHOOK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "PAYHOOK_TOPIC_PREFIX": settings.topic_prefix,
        "PAYHOOK_HTTP_PORT": str(port),
        "PAYHOOK_SPOOL_DIR": str(settings.spool_dir),
        "PAYHOOK_PUBLISH_TIMEOUT": "2",
        "PAYHOOK_SHUTDOWN_TIMEOUT": "5",
    }


async def start_serve(settings: Settings, port: int) -> asyncio.subprocess.Process:
    """``payhook serve`` as a process on ``port``, its output discarded."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("payhook")),
        "serve",
        env=serve_env(settings, port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def wait_status(http: ClientSession, url: str, status: int, within: float = 30) -> None:
    """Polls ``url`` until it answers ``status`` (a condition with a deadline)."""
    async with asyncio.timeout(within):
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == status:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.05)


async def test_sigterm_readiness_first_inflight_finishes_exit_zero(
    own_broker: LocalBroker, settings_factory: SettingsFactory, http: ClientSession
) -> None:
    settings = settings_factory(kafka_bootstrap=own_broker.bootstrap)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await start_serve(settings, port)
    try:
        await wait_status(http, f"{base}/readyz", 200)
        freeze(own_broker)  # the request below stays in flight for publish_timeout
        try:
            order = "o-5"
            inflight = asyncio.create_task(
                http.post(
                    f"{base}/v1/webhooks/bitfinex/{order}",
                    params={"token": token_for(settings, "bitfinex", order)},
                    data=webhook(order),
                    headers={"Content-Type": "application/json"},
                )
            )
            # Readiness answers before the in-flight publish does (it asks the spool first).
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 200
            proc.send_signal(signal.SIGTERM)
            await wait_status(http, f"{base}/readyz", 503)
            response = await asyncio.wait_for(inflight, 10)
            assert response.status == 200
            event_id = (await response.json())["event_id"]
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            thaw(own_broker)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # The in-flight event was spooled (or acked late): a new process delivers it.
    proc = await start_serve(settings, port)
    try:
        records = await read_records(own_broker.bootstrap, settings.events_topic, 1, within=30)
        assert event_id in event_ids(records)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines ``payhook serve`` wrote (others, if any, are skipped)."""
    lines: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def metric(http: ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not on /metrics")


async def test_sigterm_with_kafka_unreachable_leaves_the_spool_to_the_next_start(
    own_broker: LocalBroker, settings_factory: SettingsFactory, http: ClientSession, tmp_path: Path
) -> None:
    """Kafka is gone with events in the spool: on SIGTERM serve keeps trying until its shutdown
    timeout, then says how many it leaves and where, and exits 0. The next start on the same
    directory drains them before anything accepted after it (one invoice: one partition, in
    order) and shows on /metrics that it found them."""
    settings = settings_factory(kafka_bootstrap=own_broker.bootstrap)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    shutdown_timeout = 5.0  # serve_env's PAYHOOK_SHUTDOWN_TIMEOUT

    async def start() -> asyncio.subprocess.Process:
        with log.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("payhook")),
                "serve",
                env=serve_env(settings, port),
                stdout=out,
                stderr=out,
            )

    async def accept(status: str) -> str:
        body = webhook("o-left", status=status, invoice="inv-left")
        async with await post(http_client, settings, "o-left", body) as response:
            assert response.status == 200, await response.text()
            event_id: str = (await response.json())["event_id"]
            return event_id

    http_client = _BaseUrl(http, base)
    proc = await start()
    try:
        await wait_status(http, f"{base}/readyz", 200)
        own_broker.stop()  # Kafka unreachable: what is accepted now is only in the spool
        left = [await accept(status) for status in ("CREATED", "PENDING", "COMPLETED")]
        assert await metric(http, base, "payhook_spool_depth") == 3
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # it kept trying for the whole shutdown timeout (after the 1 s readiness grace)
        assert time.monotonic() - started >= shutdown_timeout
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = log_events(log)
    names = [e["event"] for e in events]
    draining = names.index("spool_draining_before_exit")
    assert "spool_drain_failed" in names[draining:], "no attempt during the shutdown"
    (behind,) = [e for e in events if e["event"] == "spool_left_behind"]
    assert behind["level"] == "warning"
    assert behind["depth"] == 3
    assert behind["directory"] == str(settings.spool_dir.resolve())
    assert names.index("spool_left_behind") > draining

    own_broker.start()  # an empty broker: serve creates the topics again at start
    proc = await start()
    try:
        await wait_status(http, f"{base}/readyz", 200)
        assert await metric(http, base, "payhook_spool_recovered_events") == 3
        assert await metric(http, base, "payhook_spool_recovered_timestamp_seconds") > 0
        after = await accept("EXPIRED")
        records = await read_records(own_broker.bootstrap, settings.events_topic, 4, within=30)
        assert distinct(event_ids(records)) == [*left, after]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert "spool_left_behind" not in [e["event"] for e in log_events(log)][len(events) :]


class _BaseUrl:
    """``post`` takes a test client (paths relative to the server): this one prefixes them."""

    def __init__(self, http: ClientSession, base: str) -> None:
        self._http = http
        self._base = base

    def post(self, path: str, **kwargs: Any) -> Any:
        return self._http.post(self._base + path, **kwargs)
