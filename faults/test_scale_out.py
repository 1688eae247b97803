"""Scale-out on one PostgreSQL: three ``payhook consume`` processes in one group under load.

5: one of the three is SIGKILLed right after a batch landed and restarted; 6: two run and a
third joins mid-load (a rebalance moves partitions, and batches in flight with them). After
each: every webhook answered 2xx is on the events topic and counted exactly once in the
store, every invoice's paid amount is what its last notification states, and on the
settlements topic an invoice's versions never go down and a version republished (after the
kill) carries the same bytes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from faults.harness import Cluster, Load, Verdict, read_topic, webhooks
from faults.scale import (
    Fleet,
    judge_two_step,
    read_postgres,
    read_settlements,
    settlement_problems,
    store_versions,
    two_step_load,
    wait_stored_postgres,
)
from faults.test_faults import RATE, accepted_ids, until

INVOICES = 480  # and a PENDING notification before each Bitfinex one's final: 720 webhooks


@pytest.fixture
async def fleet(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession, postgres_url: str
) -> AsyncIterator[Fleet]:
    """A broker and ``payhook serve``; consumers are added and started by each scenario."""
    cluster = Cluster(tmp_path_factory.mktemp("fleet"))
    fleet = Fleet(cluster, postgres_url)
    try:
        cluster.broker.start()
        await cluster.serve.start()
        await cluster.wait_serve_ready(http)
        yield fleet
    finally:
        await fleet.stop()
        await cluster.stop()


async def stored_grows(fleet: Fleet, minimum: int, within: float) -> None:
    """Returns right after the store counted a new batch, with at least ``minimum`` events."""
    deadline = time.monotonic() + within
    before = len((await read_postgres(fleet.store_url)).counted)
    while True:
        now = len((await read_postgres(fleet.store_url)).counted)
        if now >= minimum and now > before:
            return
        before = now
        assert time.monotonic() < deadline, "the consumers are not storing anything"
        await asyncio.sleep(0.005)  # a tight poll: the commit follows the store in milliseconds


async def finish(
    fault: str, fleet: Fleet, http: aiohttp.ClientSession, load: Load, verdicts: list[Verdict]
) -> None:
    cluster = fleet.cluster
    accepted = accepted_ids(load.outcomes)
    on_topic = await read_topic(
        cluster.broker.bootstrap,
        cluster.events_topic,
        lambda counts: accepted <= counts.keys(),
        within=90,
    )
    stored = await wait_stored_postgres(fleet.store_url, accepted, within=120)
    await fleet.wait_ready(http)
    versions = await store_versions(fleet.store_url)
    log = await read_settlements(
        cluster.broker.bootstrap, f"{cluster.topic_prefix}.settlements.v1", versions, within=60
    )
    verdict = judge_two_step(
        fault,
        load.outcomes,
        on_topic,
        stored,
        await fleet.duplicates(http),
        settlement_problems(log, versions),
        sum(len(records) for records in log.values()),
    )
    verdicts.append(verdict)
    assert verdict.accepted > 0
    assert verdict.lost == 0, verdict.problems
    assert verdict.miscounted == 0, verdict.problems
    assert not verdict.problems
    # Bitfinex invoices reached version 2 (PENDING, then COMPLETED): the versions judged moved.
    assert max(versions.values()) == 2


async def test_three_consumers_one_sigkilled_and_restarted(
    fleet: Fleet, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    for _ in range(3):
        await fleet.add().start()
    await fleet.wait_ready(http)
    hooks = two_step_load(webhooks(fleet.cluster.env["PAYHOOK_SIGNING_KEYS"], "s5", INVOICES))
    load = Load(http, fleet.cluster.base_url, RATE)
    running = asyncio.create_task(load.run(hooks))
    try:
        await stored_grows(fleet, 120, within=60)
        victim = fleet.consumers[1]
        victim.signal(signal.SIGKILL)
        await victim.wait(10)
        await victim.start()
    except BaseException:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        raise
    await running
    await finish("5 3 consumers, SIGKILL one (PG)", fleet, http, load, verdicts)


async def test_three_consumers_one_joining_mid_load(
    fleet: Fleet, http: aiohttp.ClientSession, verdicts: list[Verdict]
) -> None:
    for _ in range(2):
        await fleet.add().start()
    await fleet.wait_ready(http)
    hooks = two_step_load(webhooks(fleet.cluster.env["PAYHOOK_SIGNING_KEYS"], "s6", INVOICES))
    load = Load(http, fleet.cluster.base_url, RATE)
    running = asyncio.create_task(load.run(hooks))
    try:
        await until(lambda: len(accepted_ids(load.outcomes)) >= 120, 30, "120 accepted")
        joiner = fleet.add()
        await joiner.start()
        await fleet.wait_ready(http)
    except BaseException:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        raise
    await running
    await finish("6 2 consumers + 1 joining (PG)", fleet, http, load, verdicts)
    # The rebalance gave the newcomer partitions: it settled events of its own.
    assert await fleet.counter(http, 2, "processed") > 0
