"""``payhook dlq list`` and ``payhook dlq redrive`` against the real broker and a real consumer:
records redriven once, a record that fails again back in the DLQ with its new reason, and a
redrive killed mid-way that skips nothing."""

from __future__ import annotations

import asyncio
import signal

import msgspec

from schemas.events import InvoiceEvent
from service.consume.supervisor import Consumer
from service.settings import Settings
from tests.commands.conftest import Payhook, child, env_of, event_ids_published, payment_event
from tests.fixtures_consume import (
    Record,
    counter,
    event_record,
    produce,
    read_topic,
    running_consumer,
    wait_for,
)


def ev(n: int, invoices: int = 20) -> InvoiceEvent:
    return payment_event(n, invoices=invoices, with_order=False)


def dead(record: Record, reason: str, offset: int) -> Record:
    """A record as the consumer dead-letters it: its own headers, then why and where from."""
    key, value, headers = record
    return (
        key,
        value,
        [
            *headers,
            ("error", reason.encode()),
            ("source-topic", b"payhook.invoice-events.v1"),
            ("source-partition", b"0"),
            ("source-offset", str(offset).encode()),
        ],
    )


def processed(consumer: Consumer) -> float:
    return counter(consumer, "payhook_consumer_events_total", outcome="processed")


async def test_list_then_redrive_once_and_a_record_that_fails_again_returns_with_its_reason(
    consume_settings: Settings, payhook: Payhook
) -> None:
    settings = consume_settings
    env = env_of(settings)
    good = ev(1)
    broken = (b"bitfinex:broken", b'{"schema": "payhook.invoice-event.v1"}', [("event-id", b"x")])
    # Dead-lettered by an older release: a valid event, and one that can never be processed.
    await produce(
        settings,
        [dead(event_record(good), "store: was down", 7), dead(broken, "old reason", 8)],
        topic=settings.dlq_topic,
    )

    listed = await payhook(env, "dlq", "list", "--json")
    assert listed.code == 0, listed
    records = [msgspec.json.decode(line) for line in listed.out.splitlines()]
    assert {(r["key"], r["error"], r["source_offset"], r["redriven"]) for r in records} == {
        ("bitfinex:inv-1", "store: was down", 7, False),
        ("bitfinex:broken", "old reason", 8, False),
    }
    people = await payhook(env, "dlq", "list")
    assert people.out.splitlines()[-1] == (f"2 records in {settings.dlq_topic}, 2 not redriven yet")

    dry = await payhook(env, "dlq", "redrive", "--dry-run")
    assert dry.code == 0
    assert dry.out.splitlines()[-1] == f"2 records would be redriven to {settings.events_topic}"
    assert sum(line.startswith("would redrive ") for line in dry.out.splitlines()) == 2

    async with running_consumer(settings):
        moved = await payhook(env, "dlq", "redrive")
        assert moved.code == 0, moved
        assert moved.out.splitlines()[-1].startswith(
            f"2 records redriven to {settings.events_topic}"
        )
        events = await read_topic(settings, settings.events_topic, lambda r: len(r) >= 2)
        origins = {r.key: dict(r.headers) for r in events}
        # Original key and bytes; the record's own headers; the DLQ's replaced by where from.
        assert {r.key: r.value for r in events} == {
            event_record(good)[0]: event_record(good)[1],
            broken[0]: broken[1],
        }
        assert origins[b"bitfinex:inv-1"]["event-id"] == b"e1"
        assert "error" not in origins[b"bitfinex:inv-1"]
        assert {dict(r.headers)["redriven-from"].decode() for r in events} == {
            f"{r['partition']}:{r['offset']}" for r in records
        }
        # The valid one is settled; the broken one is back in the DLQ with the consumer's reason.
        settled = await read_topic(settings, settings.settlements_topic, lambda r: len(r) >= 1)
        assert [r.key for r in settled] == [b"bitfinex:inv-1"]
        back = await read_topic(settings, settings.dlq_topic, lambda r: len(r) >= 3)
    returned = [r for r in back if dict(r.headers).get("redriven-from")]
    assert len(returned) == 1
    headers = dict(returned[0].headers)
    assert headers["error"].startswith(b"undecodable:")
    assert returned[0].value == broken[1]

    # Redriven once: only the record that came back is still to move.
    again = await payhook(env, "dlq", "redrive", "--dry-run")
    assert again.out.splitlines()[-1] == f"1 records would be redriven to {settings.events_topic}"
    listed = await payhook(env, "dlq", "list", "--json")
    final = [msgspec.json.decode(line) for line in listed.out.splitlines()]
    assert sorted(r["redriven"] for r in final) == [False, True, True]
    [waiting] = [r for r in final if not r["redriven"]]
    assert waiting["redriven_from"] is not None
    assert waiting["error"].startswith("undecodable:")


async def test_an_unreachable_broker_is_one_line(
    kafka_settings: Settings, payhook: Payhook, unreachable: str
) -> None:
    env = env_of(kafka_settings, PAYHOOK_KAFKA_BOOTSTRAP=unreachable)
    for args in (("list",), ("redrive",), ("redrive", "--dry-run")):
        ran = await payhook(env, "dlq", *args)
        assert ran.code == 1
        assert len(ran.err.splitlines()) == 1, ran.err
        assert "PAYHOOK_KAFKA_BOOTSTRAP" in ran.err
        assert "Traceback" not in ran.err


async def test_a_redrive_killed_mid_way_and_run_again_skips_nothing(
    consume_settings: Settings,
) -> None:
    settings = consume_settings
    env = env_of(settings)
    count = 2000
    await produce(
        settings,
        [dead(event_record(ev(n)), "store: was down", n) for n in range(count)],
        topic=settings.dlq_topic,
    )
    first = child(env, "dlq", "redrive")
    assert first.stdout is not None
    # Killed right after its first batch was acknowledged and its position committed.
    line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 60)
    assert line.startswith("redriven ")
    first.kill()
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    dry = child(env, "dlq", "redrive", "--dry-run")
    out, _ = await asyncio.to_thread(dry.communicate, timeout=60)
    left = int(out.splitlines()[-1].split()[0])
    assert 0 < left < count

    second = child(env, "dlq", "redrive")
    out, err = await asyncio.to_thread(second.communicate, timeout=120)
    assert second.returncode == 0, err
    assert await event_ids_published(settings, count) == {f"e{n}" for n in range(count)}
    async with running_consumer(settings) as consumer:
        await wait_for(lambda: processed(consumer) == count, within=60, what="every event")
        for n in range(20):
            state = await consumer.store.get(f"bitfinex:inv-{n}")
            assert state is not None
            assert len(state.settlement.payments) == count // 20
