"""The four faults of issue 4, each against a fresh set of real processes under steady load.

After each: every webhook answered 2xx is on ``payhook.invoice-events.v1`` at least once and
counted exactly once in the consumer's store, with the amount its notification states.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp

from faults.harness import (
    Cluster,
    Load,
    Outcome,
    Stored,
    Verdict,
    judge,
    read_topic,
    wait_stored,
    webhooks,
)

RATE = 40.0  # webhooks per second
OUTAGE_SECONDS = 10.0


def accepted_ids(outcomes: list[Outcome]) -> set[str]:
    return {o.event_id for o in outcomes if o.status == 200 and o.event_id is not None}


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Waits for a condition on state that other tasks change (the load's answers)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def store_grows(cluster: Cluster, minimum: int, within: float) -> None:
    """Returns right after the consumer stored a new batch, with at least ``minimum`` events."""
    deadline = time.monotonic() + within
    before = len((await asyncio.to_thread(Stored.read, cluster.db_path)).counted)
    while True:
        now = len((await asyncio.to_thread(Stored.read, cluster.db_path)).counted)
        if now >= minimum and now > before:
            return
        before = now
        assert time.monotonic() < deadline, "the consumer is not storing anything"
        await asyncio.sleep(0.002)  # a tight poll: the commit follows the store in milliseconds


@contextlib.asynccontextmanager
async def steady_load(
    cluster: Cluster, http: aiohttp.ClientSession, tag: str, count: int
) -> AsyncIterator[Load]:
    """``count`` webhooks posted at ``RATE`` while the body runs; on exit waits for the rest."""
    hooks = webhooks(cluster.env["PAYHOOK_SIGNING_KEYS"], tag, count)
    load = Load(http, cluster.base_url, RATE)
    running = asyncio.create_task(load.run(hooks))
    try:
        yield load
    except BaseException:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        raise
    await running


async def finish(
    fault: str,
    cluster: Cluster,
    http: aiohttp.ClientSession,
    load: Load,
    verdicts: list[Verdict],
    earlier_reads: collections.Counter[str] | None = None,
) -> None:
    """Waits until what was accepted is on the topic and in the store, then judges."""
    accepted = accepted_ids(load.outcomes)
    # A previous broker's reads (fault 1) count as found; this broker holds only what followed.
    seen_before = earlier_reads or collections.Counter()
    expected_now = accepted - seen_before.keys()
    on_topic = await read_topic(
        cluster.broker.bootstrap,
        cluster.events_topic,
        lambda counts: expected_now <= counts.keys(),
        within=90,
    )
    stored = await wait_stored(cluster.db_path, accepted, within=90)
    await cluster.wait_consumer_ready(http)
    verdict = judge(
        fault,
        load.outcomes,
        on_topic + seen_before,
        stored,
        await cluster.consumer_duplicates(http),
    )
    verdicts.append(verdict)
    assert verdict.accepted > 0
    assert verdict.lost == 0, verdict.problems
    assert verdict.miscounted == 0, verdict.problems
    assert not verdict.problems


async def test_broker_down_10s_then_restarted(
    cluster: Cluster, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    hooks = webhooks(cluster.env["PAYHOOK_SIGNING_KEYS"], "f1", 640)
    load = Load(http, cluster.base_url, RATE)
    await load.run(hooks[:80])
    # The local broker forgets everything when it stops: let the consumer catch up first.
    before = accepted_ids(load.outcomes)
    assert len(before) == 80
    stored = await wait_stored(cluster.db_path, before, within=60)
    assert before <= stored.counted.keys()
    first_reads = await read_topic(
        cluster.broker.bootstrap,
        cluster.events_topic,
        lambda counts: before <= counts.keys(),
        within=30,
    )
    cluster.broker.stop()
    running = asyncio.create_task(load.run(hooks[80:]))
    await asyncio.sleep(OUTAGE_SECONDS)  # the fault's duration, not a synchronization
    cluster.broker.start()
    await running
    await finish("1 broker stopped 10 s, restarted", cluster, http, load, verdicts, first_reads)


async def test_sigkill_serve_with_events_in_its_spool(
    cluster: Cluster, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    async with steady_load(cluster, http, "f2", 400) as load:
        await until(lambda: len(accepted_ids(load.outcomes)) >= 60, 30, "60 accepted")
        # A frozen broker acks nothing: what is accepted now is only in serve's spool...
        cluster.freeze_broker()
        try:
            spooled_from = len(accepted_ids(load.outcomes))
            await until(
                lambda: len(accepted_ids(load.outcomes)) >= spooled_from + 30, 30, "30 spooled"
            )
            # ...and serve dies without a chance to flush anything.
            cluster.serve.signal(signal.SIGKILL)
            await cluster.serve.wait(10)
        finally:
            cluster.thaw_broker()
        await cluster.serve.start()
        await cluster.wait_serve_ready(http)
    await finish("2 SIGKILL serve (spool non-empty)", cluster, http, load, verdicts)


async def test_sigkill_consumer_mid_batch(
    cluster: Cluster, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    async with steady_load(cluster, http, "f3", 400) as load:
        # Right after a batch landed in the store, while the next one is on its way.
        await store_grows(cluster, 80, within=60)
        cluster.consume.signal(signal.SIGKILL)
        await cluster.consume.wait(10)
        await cluster.consume.start()
    await finish("3 SIGKILL consume mid-batch", cluster, http, load, verdicts)


async def test_sigterm_serve_under_load(
    cluster: Cluster, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    async with steady_load(cluster, http, "f4", 400) as load:
        await until(lambda: len(accepted_ids(load.outcomes)) >= 80, 30, "80 accepted")
        cluster.serve.signal(signal.SIGTERM)
        # Readiness turns first, then in-flight requests finish and the process exits 0 in time.
        await asyncio.wait_for(_until_status(http, f"{cluster.base_url}/readyz", 503), timeout=2)
        assert await cluster.serve.wait(within=20) == 0
        await cluster.serve.start()
        await cluster.wait_serve_ready(http)
    await finish("4 SIGTERM serve under load", cluster, http, load, verdicts)


async def _until_status(http: aiohttp.ClientSession, url: str, status: int) -> None:
    while True:
        try:
            async with http.get(url) as response:
                if response.status == status:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.02)
