"""``payhook spool status`` and ``payhook spool drain`` on real spool directories, the real
broker, a real ``payhook serve`` holding its spool, and a drain killed mid-way."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import msgspec
from aiohttp import ClientSession

from devtools.devbroker import free_port
from schemas.events import InvoiceEvent
from service.ingest.spool import Spool, SpooledEvent
from service.kafka import encode_event, event_headers, event_key
from service.settings import Settings
from tests.commands.conftest import Payhook, child, env_of, event_ids_published, payment_event
from tests.fixtures_consume import read_topic, running_consumer, wait_for
from tests.ingest.test_durability import start_serve, wait_status


def ev(n: int, invoices: int = 50) -> InvoiceEvent:
    """Event ``n``: one more payment on one of ``invoices`` Bitfinex invoices."""
    return payment_event(n, invoices=invoices, with_order=True)


async def fill(directory: Path, count: int, spooled_at: float | None = None) -> list[str]:
    """A spool as a stopped serve leaves it; the event ids, oldest first."""
    async with Spool(directory, 1 << 28) as spool:
        for n in range(count):
            event = ev(n)
            await spool.append(
                SpooledEvent(
                    key=event_key(event),
                    value=encode_event(event),
                    headers=tuple(event_headers(event)),
                    spooled_at=time.time() if spooled_at is None else spooled_at,
                )
            )
    return [f"e{n}" for n in range(count)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_status_reads_depth_bytes_and_age_without_changing_a_byte(
    tmp_path: Path, payhook: Payhook, kafka_settings: Settings
) -> None:
    spool_dir = tmp_path / "spool"
    await fill(spool_dir, 3, spooled_at=time.time() - 120)
    before = snapshot(spool_dir)
    env = env_of(kafka_settings, PAYHOOK_SPOOL_DIR=str(spool_dir))
    ran = await payhook(env, "spool", "status", "--json")
    assert ran.code == 0
    status = msgspec.json.decode(ran.out)
    assert status["depth"] == 3
    assert status["bytes"] == sum(len(v) for k, v in before.items() if k.endswith(".seg"))
    assert 120 <= status["oldest_age_seconds"] < 180
    assert status["locked"] is False
    people = await payhook(env, "spool", "status", str(spool_dir))
    assert people.out.startswith(f"{spool_dir}: 3 records, ")
    assert snapshot(spool_dir) == before

    # Acknowledged records no longer count; a live holder is reported, and status still reads.
    async with Spool(spool_dir, 1 << 28) as spool:
        await spool.ack(2)
        held = msgspec.json.decode((await payhook(env, "spool", "status", "--json")).out)
        assert (held["depth"], held["locked"]) == (1, True)


async def test_status_of_an_empty_spool_exits_0_and_of_no_spool_1(
    tmp_path: Path, payhook: Payhook, kafka_settings: Settings
) -> None:
    env = env_of(kafka_settings)
    (tmp_path / "empty").mkdir()
    ran = await payhook(env, "spool", "status", str(tmp_path / "empty"), "--json")
    assert ran.code == 0
    assert msgspec.json.decode(ran.out)["depth"] == 0
    missing = await payhook(env, "spool", "status", str(tmp_path / "nope"))
    assert missing.code == 1
    assert len(missing.err.splitlines()) == 1
    assert "PAYHOOK_SPOOL_DIR" in missing.err


async def test_drain_sends_in_order_with_acks_and_leaves_it_empty(
    tmp_path: Path, payhook: Payhook, kafka_settings: Settings
) -> None:
    spool_dir = tmp_path / "left-behind"
    ids = await fill(spool_dir, 30)
    env = env_of(kafka_settings)
    ran = await payhook(env, "spool", "drain", str(spool_dir))
    assert ran.code == 0, ran
    assert ran.out.splitlines()[-1].endswith(
        "30 records sent to " + kafka_settings.events_topic + ", 0 left"
    )
    records = await read_topic(kafka_settings, kafka_settings.events_topic, lambda r: len(r) >= 30)
    by_partition: dict[int, list[str]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(dict(r.headers)["event-id"].decode())
    # Per partition (so per invoice), the spool's order.
    for seen in by_partition.values():
        assert seen == [i for i in ids if i in seen]
    assert sorted(i for seen in by_partition.values() for i in seen) == sorted(ids)
    status = msgspec.json.decode(
        (await payhook(env, "spool", "status", str(spool_dir), "--json")).out
    )
    assert (status["depth"], status["bytes"]) == (0, 0)  # nothing left on the volume
    assert not list(spool_dir.glob("*.seg"))
    again = await payhook(env, "spool", "drain", str(spool_dir))
    assert again.code == 0
    assert "0 records sent" in again.out


async def test_drain_with_kafka_unreachable_leaves_the_spool_intact(
    tmp_path: Path, payhook: Payhook, kafka_settings: Settings, unreachable: str
) -> None:
    spool_dir = tmp_path / "spool"
    await fill(spool_dir, 5)
    before = snapshot(spool_dir)
    env = env_of(kafka_settings, PAYHOOK_KAFKA_BOOTSTRAP=unreachable)
    ran = await payhook(env, "spool", "drain", str(spool_dir))
    assert ran.code == 1
    assert len(ran.err.splitlines()) == 1
    assert "PAYHOOK_KAFKA_BOOTSTRAP" in ran.err
    after = snapshot(spool_dir)
    after.pop("lock", None)
    before.pop("lock", None)
    assert after == before


async def test_drain_refuses_a_spool_a_live_serve_holds_and_takes_it_once_serve_is_killed(
    tmp_path: Path, payhook: Payhook, kafka_settings: Settings
) -> None:
    settings = kafka_settings
    await fill(settings.spool_dir, 3)
    port = free_port()
    serve = await start_serve(settings, port)
    try:
        async with ClientSession() as http:
            await wait_status(http, f"http://127.0.0.1:{port}/healthz", 200)
        ran = await payhook(env_of(settings), "spool", "drain", str(settings.spool_dir))
        assert ran.code == 1
        assert "held by a live process" in ran.err
        assert len(ran.err.splitlines()) == 1
    finally:
        serve.send_signal(signal.SIGKILL)
        await serve.wait()
    # serve drained its spool at start (Kafka is up); a SIGKILL leaves no lock behind.
    ran = await payhook(env_of(settings), "spool", "drain", str(settings.spool_dir))
    assert ran.code == 0, ran
    records = await read_topic(settings, settings.events_topic, lambda r: len(r) >= 3)
    assert {dict(r.headers)["event-id"] for r in records} == {b"e0", b"e1", b"e2"}


async def test_a_drain_killed_mid_way_and_run_again_skips_nothing(
    tmp_path: Path, consume_settings: Settings
) -> None:
    settings = consume_settings
    spool_dir = tmp_path / "big"
    count = 3000
    ids = await fill(spool_dir, count)
    env = env_of(settings)
    first = child(env, "spool", "drain", str(spool_dir))
    assert first.stdout is not None
    # Killed right after its first batch was acknowledged: the rest is still to send.
    line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 60)
    assert line.startswith("sent ")
    first.kill()
    first.communicate()  # reaps it and closes its pipes
    assert first.returncode == -signal.SIGKILL
    left = msgspec.json.decode(
        await asyncio.to_thread(
            lambda: child(env, "spool", "status", str(spool_dir), "--json").communicate()[0]
        )
    )
    assert 0 < left["depth"] < count
    second = child(env, "spool", "drain", str(spool_dir))
    _, err = await asyncio.to_thread(second.communicate, timeout=120)
    assert second.returncode == 0, err
    assert await event_ids_published(settings, count) == set(ids)
    # The consumer settles every invoice once per distinct event, repeats dropped.
    async with running_consumer(settings) as consumer:
        await wait_for(
            lambda: (
                consumer.metrics.registry.get_sample_value(
                    "payhook_consumer_events_total", {"outcome": "processed"}
                )
                == count
            ),
            within=60,
            what="every distinct event processed",
        )
        for n in range(50):
            state = await consumer.store.get(f"bitfinex:inv-{n}")
            assert state is not None
            assert len(state.settlement.payments) == count // 50
