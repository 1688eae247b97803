"""The spool on a real disk: framing, torn tails, restart recovery, bounds, drain order."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service.errors import Unavailable
from service.ingest.metrics import IngestMetrics
from service.ingest.spool import (
    Spool,
    SpooledEvent,
    SpoolError,
    SpoolFull,
    drain_forever,
    encode_frame,
)


def event(n: int, *, at: float = 1000.0, size: int = 40) -> SpooledEvent:
    return SpooledEvent(
        key=f"bitfinex:inv-{n}".encode(),
        value=(f'{{"n":{n}}}'.encode()).ljust(size, b" "),
        headers=(("event-id", f"ev-{n}".encode()), ("provider", b"bitfinex")),
        spooled_at=at + n,
    )


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def gauge(metrics: IngestMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


async def test_append_read_ack_in_order(tmp_path: Path) -> None:
    metrics = IngestMetrics()
    async with Spool(tmp_path, 1 << 20, metrics=metrics) as spool:
        for n in range(5):
            await spool.append(event(n))
        assert spool.depth == 5
        assert spool.holds_events
        assert gauge(metrics, "payhook_spool_depth") == 5
        assert gauge(metrics, "payhook_spool_bytes") == spool.size_bytes > 0
        assert await spool.read(3) == [event(0), event(1), event(2)]
        await spool.ack(2)
        assert await spool.read(10) == [event(2), event(3), event(4)]
        assert gauge(metrics, "payhook_spool_drained_events_total") == 2
        await spool.ack(3)
        assert spool.depth == 0
        assert not spool.holds_events
        assert spool.size_bytes == 0
        assert segments(tmp_path) == []
        assert gauge(metrics, "payhook_spool_bytes") == 0


async def test_concurrent_appends_share_fsyncs_and_keep_call_order(tmp_path: Path) -> None:
    async with Spool(tmp_path, 1 << 22) as spool:
        await asyncio.gather(*(spool.append(event(n)) for n in range(300)))
        assert spool.depth == 300
        assert spool.flushes < 300
        assert await spool.read(300) == [event(n) for n in range(300)]


async def test_restart_recovers_unacked_records(tmp_path: Path) -> None:
    async with Spool(tmp_path, 1 << 20) as spool:
        for n in range(6):
            await spool.append(event(n))
        await spool.ack(2)
    async with Spool(tmp_path, 1 << 20) as spool:
        assert spool.depth == 4
        assert await spool.read(10) == [event(n) for n in range(2, 6)]
        await spool.append(event(6))
    async with Spool(tmp_path, 1 << 20) as spool:
        assert await spool.read(10) == [event(n) for n in range(2, 7)]


async def test_recovery_across_segments_deletes_acked_ones(tmp_path: Path) -> None:
    async with Spool(tmp_path, 1 << 20, segment_bytes=4096) as spool:
        for n in range(100):
            await spool.append(event(n, size=200))
        assert len(segments(tmp_path)) > 3
        await spool.ack(60)
        # Fully acknowledged segments are gone; the bytes follow.
        assert spool.size_bytes == sum(p.stat().st_size for p in segments(tmp_path))
    async with Spool(tmp_path, 1 << 20, segment_bytes=4096) as spool:
        assert await spool.read(100) == [event(n, size=200) for n in range(60, 100)]


@pytest.mark.parametrize("cut", [1, 7, 13, 30])
async def test_torn_last_record_is_skipped(tmp_path: Path, cut: int) -> None:
    async with Spool(tmp_path, 1 << 20) as spool:
        for n in range(3):
            await spool.append(event(n))
    [segment] = segments(tmp_path)
    frame = len(encode_frame(event(2)))
    size = segment.stat().st_size
    # The crash came in the middle of the last record: keep `cut` bytes of it.
    os.truncate(segment, size - frame + cut)
    with capture_logs() as logs:
        async with Spool(tmp_path, 1 << 20) as spool:
            assert await spool.read(10) == [event(0), event(1)]
            await spool.append(event(3))
    assert [entry["event"] for entry in logs].count("spool_torn_record") == 1
    async with Spool(tmp_path, 1 << 20) as spool:
        assert await spool.read(10) == [event(0), event(1), event(3)]


async def test_zero_filled_tail_and_flipped_bit_are_detected(tmp_path: Path) -> None:
    async with Spool(tmp_path, 1 << 20) as spool:
        for n in range(3):
            await spool.append(event(n))
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0x01  # a bit of the last record's payload
    segment.write_bytes(bytes(data) + b"\0" * 4096)
    async with Spool(tmp_path, 1 << 20) as spool:
        assert await spool.read(10) == [event(0), event(1)]


async def test_invalid_cursor_replays_rather_than_fails(tmp_path: Path) -> None:
    async with Spool(tmp_path, 1 << 20) as spool:
        for n in range(3):
            await spool.append(event(n))
        await spool.ack(1)
    (tmp_path / "cursor").write_bytes(b"garbage")
    with capture_logs() as logs:
        async with Spool(tmp_path, 1 << 20) as spool:
            # Duplicates downstream (absorbed by event_id), never a lost record.
            assert await spool.read(10) == [event(0), event(1), event(2)]
    assert any(entry["event"] == "spool_cursor_invalid" for entry in logs)


async def test_full_spool_refuses_with_503_and_recovers_after_drain(tmp_path: Path) -> None:
    frame = len(encode_frame(event(0)))
    async with Spool(tmp_path, frame * 4, segment_bytes=4096) as spool:
        for n in range(4):
            await spool.append(event(n))
        assert not spool.has_room(frame)
        with pytest.raises(SpoolFull) as refused:
            await spool.append(event(4))
        assert isinstance(refused.value, Unavailable)
        assert refused.value.status == 503
        assert spool.depth == 4
        await spool.ack(4)
        assert spool.has_room(frame)
        await spool.append(event(4))
        assert await spool.read(10) == [event(4)]


async def test_closed_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    await spool.start()
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.append(event(0))


async def test_oldest_age_follows_the_oldest_record(tmp_path: Path) -> None:
    now = [2000.0]
    metrics = IngestMetrics()
    async with Spool(tmp_path, 1 << 20, metrics=metrics, clock=lambda: now[0]) as spool:
        assert gauge(metrics, "payhook_spool_oldest_age_seconds") == 0
        await spool.append(event(0, at=1990.0))  # spooled_at 1990
        await spool.append(event(1, at=1990.0))  # spooled_at 1991
        assert gauge(metrics, "payhook_spool_oldest_age_seconds") == 10
        await spool.ack(1)
        assert gauge(metrics, "payhook_spool_oldest_age_seconds") == 9


class ListSink:
    """Collects what the drainer publishes; refuses the first ``failures`` batches."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.published: list[SpooledEvent] = []

    async def publish_spooled(self, events: Sequence[SpooledEvent]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.published.extend(events)


async def test_drainer_republishes_in_order_after_failures(tmp_path: Path) -> None:
    sink = ListSink(failures=2)
    async with Spool(tmp_path, 1 << 20) as spool:
        for n in range(7):
            await spool.append(event(n))
        drainer = asyncio.create_task(drain_forever(spool, sink, batch_size=3, min_backoff=0.001))
        try:
            await asyncio.wait_for(spool.wait_empty(), 10)
            await spool.append(event(7))
            await asyncio.wait_for(spool.wait_empty(), 10)
        finally:
            drainer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await drainer
    assert sink.published == [event(n) for n in range(8)]
