"""Scale-out on PostgreSQL: several ``payhook consume`` processes in one group, one store.

What the scenarios add to the harness: a fleet of consumers on their own probe ports, the
PostgreSQL store read back, Bitfinex invoices notified twice (PENDING with the first payment,
then COMPLETED with every payment, so each has a version 1 and a version 2 and the two land in
different batches, often around a rebalance), the settlements topic read back and judged:
versions of an invoice never go down on the topic, and a version published twice is published
with the same bytes.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Final

import aiohttp
import asyncpg
import msgspec
from aiokafka import ConsumerRecord

from devtools.devbroker import free_port
from faults.harness import (
    PAYHOOK,
    Cluster,
    Outcome,
    Process,
    Stored,
    Verdict,
    Webhook,
    judge,
    read_from_start,
    wait_status,
)
from service.consume.reconcile import InvoiceState

_STATE: Final = msgspec.json.Decoder(InvoiceState)
_VERSION: Final = msgspec.json.Decoder(dict[str, object])


@dataclass(slots=True)
class Fleet:
    """``payhook consume`` processes sharing the cluster's group and one PostgreSQL store."""

    cluster: Cluster
    store_url: str
    consumers: list[Process] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def add(self) -> Process:
        port = free_port()
        env = {
            **self.cluster.env,
            "PAYHOOK_STORE_URL": self.store_url,
            "PAYHOOK_CONSUMER_PORT": str(port),
        }
        n = len(self.consumers)
        process = Process(
            f"consume-{n}", [PAYHOOK, "consume"], env, self.cluster.workdir / f"consume-{n}.log"
        )
        self.consumers.append(process)
        self.ports.append(port)
        return process

    async def wait_ready(self, http: aiohttp.ClientSession, within: float = 60) -> None:
        for process, port in zip(self.consumers, self.ports, strict=True):
            url = f"http://127.0.0.1:{port}/readyz"
            await wait_status(http, url, 200, within, process)

    async def counter(self, http: aiohttp.ClientSession, index: int, outcome: str) -> int:
        """``payhook_consumer_events_total{outcome}`` of one running consumer process."""
        url = f"http://127.0.0.1:{self.ports[index]}/metrics"
        async with http.get(url) as response:
            text = await response.text()
        prefix = f'payhook_consumer_events_total{{outcome="{outcome}"}}'
        for line in text.splitlines():
            if line.startswith(prefix):
                return int(float(line.split()[-1]))
        return 0

    async def duplicates(self, http: aiohttp.ClientSession) -> int:
        return sum([await self.counter(http, i, "duplicate") for i in range(len(self.ports))])

    async def stop(self) -> None:
        for process in self.consumers:
            if process.proc is not None and process.proc.returncode is None:
                process.signal(15)
                try:
                    await process.wait(15)
                except TimeoutError:
                    await process.kill()


# --- the notifications: Bitfinex invoices paid in two steps -----------------------------------


def pending_first(hook_body: bytes) -> tuple[bytes, Decimal]:
    """The PENDING notification that precedes a COMPLETED Bitfinex one: its first payment
    only. Returns the body and the paid amount it states."""
    body = json.loads(hook_body)
    body["status"] = "PENDING"
    body.pop("additionalPayments", None)
    return json.dumps(body).encode(), Decimal(body["payment"]["amount"])


def two_step_load(hooks: Iterable[Webhook], chunk: int = 20) -> list[Webhook]:
    """For each chunk of ``hooks``: the PENDING notifications of its Bitfinex invoices, then
    every final notification of the chunk. A Bitfinex invoice's second version follows its
    first by a fraction of a second: another batch, often another consumer."""
    ordered = list(hooks)
    out: list[Webhook] = []
    for start in range(0, len(ordered), chunk):
        part = ordered[start : start + chunk]
        for hook in part:
            if hook.provider == "bitfinex":
                body, paid = pending_first(hook.body)
                out.append(replace(hook, body=body, paid=paid))
        out.extend(part)
    return out


# --- what the store and the settlements topic hold --------------------------------------------


async def read_postgres(url: str) -> Stored:
    counted: collections.Counter[str] = collections.Counter()
    paid: dict[str, Decimal | None] = {}
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key, data FROM invoices WHERE data IS NOT NULL")
    except asyncpg.UndefinedTableError:
        rows = []  # schema not created yet
    finally:
        await conn.close()
    for row in rows:
        state = _STATE.decode(row["data"])
        counted.update(fact.event_id for fact in state.facts)
        paid[row["key"]] = state.settlement.paid_amount
    return Stored(counted, paid)


async def wait_stored_postgres(url: str, event_ids: set[str], within: float) -> Stored:
    deadline = time.monotonic() + within
    while True:
        stored = await read_postgres(url)
        if event_ids <= stored.counted.keys() or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.2)


async def store_versions(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key, version FROM invoices WHERE data IS NOT NULL")
    finally:
        await conn.close()
    return {row["key"]: row["version"] for row in rows}


SettlementLog = dict[str, list[tuple[int, bytes]]]  # key -> (version, value) in topic order


async def read_settlements(
    bootstrap: str, topic: str, expected: dict[str, int], within: float
) -> SettlementLog:
    """Reads ``topic`` from the start until every key shows its ``expected`` version and a poll
    comes back empty (or ``within`` passed): each key's records in partition order."""
    log: SettlementLog = collections.defaultdict(list)

    def take(record: ConsumerRecord[bytes, bytes]) -> None:
        assert record.key is not None
        assert record.value is not None
        version = _VERSION.decode(record.value)["version"]
        assert isinstance(version, int)
        log[record.key.decode()].append((version, record.value))

    def done() -> bool:
        return all(
            log.get(key) and max(v for v, _ in log[key]) >= version
            for key, version in expected.items()
        )

    await read_from_start(bootstrap, topic, take, done, within)
    return dict(log)


def settlement_problems(log: SettlementLog, expected: dict[str, int]) -> list[str]:
    """Every invoice's latest version is on the topic; versions never go down along a key;
    the same version is never published with different content."""
    problems: list[str] = []
    for key, version in expected.items():
        records = log.get(key, [])
        if not records or records[-1][0] != version:
            problems.append(
                f"{key}: last on topic {records[-1][0] if records else None}, stored {version}"
            )
    for key, records in log.items():
        seen: dict[int, bytes] = {}
        for (before, _), (after, _) in itertools.pairwise(records):
            if after < before:
                problems.append(f"{key}: version {after} published after {before}")
        for version, value in records:
            if seen.setdefault(version, value) != value:
                problems.append(f"{key}: version {version} republished with other content")
    return problems


def judge_two_step(
    fault: str,
    outcomes: list[Outcome],
    on_topic: collections.Counter[str],
    stored: Stored,
    consumer_duplicates: int,
    settlements: list[str],
    settlement_records: int,
) -> Verdict:
    """Every 2xx on the events topic and counted exactly once; each invoice's paid amount is
    what its last notification states (:func:`judge`); the settlements topic judged as above."""
    verdict = judge(fault, outcomes, on_topic, stored, consumer_duplicates)
    return replace(
        verdict,
        problems=verdict.problems + settlements,
        settlements=settlement_records,
        settlement_faults=len(settlements),
    )
