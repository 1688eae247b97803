"""Real processes for the fault suite: a Tansu broker, ``payhook serve``, ``payhook consume``,
a load generator of signed webhooks, and readers of the events topic and the SQLite store.

Every wait is on a condition with a deadline (a process answering, a count reached); the only
timed pauses are the load's own pacing and the length of a fault.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Final

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from devtools.devbroker import LocalBroker, free_port
from service.consume.reconcile import InvoiceState
from service.ingest.secrets import mint_secret
from service.providers.cryptopos import signature as cryptopos_signature
from service.settings import parse_signing_keys

PAYHOOK: Final = str(Path(sys.executable).with_name("payhook"))
CRYPTOPOS_SECRET: Final = secrets.token_hex(16)
_STATE: Final = msgspec.json.Decoder(InvoiceState)


# --- the webhooks ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """One signed notification as the provider would send it, and what it must settle to."""

    provider: str
    invoice_id: str
    path: str
    headers: dict[str, str]
    body: bytes
    paid: Decimal  # the settlement's paid_amount once this (only) event is counted

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.invoice_id}"


def _bitfinex(keys_env: str, tag: str, n: int) -> Webhook:
    order = f"{tag}-bfx-{n}"
    amount = Decimal("0.00012345") + Decimal(n) / Decimal(10**8)
    payment = {
        "txid": f"{tag}tx{n:06d}a",
        "amount": str(amount),
        "currency": "BTC",
        "method": "BITCOIN",
        "status": "COMPLETED",
        "confirmations": 3,
        "created_at": "2024-05-01 10:00:00",
        "updated_at": "2024-05-01 10:01:00",
        "depositId": 1000 + n,
    }
    extra: list[dict[str, Any]] = []
    if n % 3 == 0:  # underpaid first, topped up by an additional payment
        extra = [{**payment, "txid": f"{tag}tx{n:06d}b", "amount": "0.00000100"}]
    paid = amount + sum((Decimal(p["amount"]) for p in extra), Decimal(0))
    body: dict[str, Any] = {
        "id": f"{tag}-bfx-inv-{n}",
        "type": "ECOMMERCE",
        "orderId": order,
        "status": "COMPLETED",
        "amount": 25,
        "currency": "USD",
        "t": 1714557600000,
        "invoices": [{"amount": str(paid), "currency": "BTC", "payCurrency": "BTC"}],
        "payment": payment,
        "customerInfo": {"fullName": "Alice Example", "email": "alice@example.com"},
    }
    if extra:
        body["additionalPayments"] = extra
    token = mint_secret(parse_signing_keys(keys_env), "bitfinex", order)
    return Webhook(
        provider="bitfinex",
        invoice_id=body["id"],
        path=f"/v1/webhooks/bitfinex/{order}?token={token}",
        headers={"Content-Type": "application/json"},
        body=_json(body),
        paid=paid,
    )


def _cryptosteroid(keys_env: str, tag: str, n: int) -> Webhook:
    order = f"{tag}-cs-{n}"
    received = Decimal("100.50") + Decimal(n) / 100
    body = {
        "merchantId": "0f6c2a5e-9d1b-4c1e-8d5a-2b9e5f3c7a11",
        "invoiceId": f"{tag}-cs-inv-{n}",
        "fiatAmount": "100.00",
        "fiatCurrency": "USD",
        "status": "PAID",
        "createdAt": "2024-05-01T10:00:00.000Z",
        "updatedAt": "2024-05-01T10:05:00.000Z",
        "externalId": order,
        "payment": {
            "method": "USDT_TRC20",
            "amount": "100.50",
            "paid": {"hash": [f"{tag}h{n}"], "received": str(received), "finished": True},
        },
    }
    token = mint_secret(parse_signing_keys(keys_env), "cryptosteroid", order)
    return Webhook(
        provider="cryptosteroid",
        invoice_id=str(body["invoiceId"]),
        path=f"/v1/webhooks/cryptosteroid/{order}",
        headers={"Content-Type": "application/json", "Token": token},
        body=_json(body),
        paid=received,
    )


def _cryptopos(tag: str, n: int) -> Webhook:
    paid = Decimal("10.25") + Decimal(n) / 100
    data = {
        "id": f"{tag}-pos-{n}",
        "client": {"name": "Alice Example", "referenceID": f"{tag}-pos-order-{n}"},
        "paidAmount": str(paid),
        "total": str(paid),
        "completed": True,
        "currency": "USDC",
        "transactions": [
            {
                "tx": f"0x{tag}{n:08d}",
                "amount": str(paid),
                "cryptoAmount": 10250000,
                "timestamp": "2024-09-05T21:00:27.000Z",
                "network": "MATIC_POLYGON",
            }
        ],
        "createdAt": "2024-09-05T20:59:47.429Z",
    }
    data_text = _json(data)
    signature = cryptopos_signature(data_text, CRYPTOPOS_SECRET.encode())
    return Webhook(
        provider="cryptopos",
        invoice_id=str(data["id"]),
        path="/v1/webhooks/cryptopos",
        headers={"Content-Type": "application/json"},
        body=b'{"signature": "' + signature.encode() + b'", "data": ' + data_text + b"}",
        paid=paid,
    )


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def webhooks(keys_env: str, tag: str, count: int) -> list[Webhook]:
    """``count`` distinct invoices, one notification each: half Bitfinex payments (a third of
    them with an additional payment), a quarter CryptoSteroid, a quarter Crypto POS."""
    made: list[Webhook] = []
    for n in range(count):
        match n % 4:
            case 0 | 1:
                made.append(_bitfinex(keys_env, tag, n))
            case 2:
                made.append(_cryptosteroid(keys_env, tag, n))
            case _:
                made.append(_cryptopos(tag, n))
    return made


# --- processes ------------------------------------------------------------------------------


@dataclass(slots=True)
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None, f"{self.name} runs"
        self.starts += 1
        with open(self.log, "ab") as out:  # noqa: ASYNC230 - opening a log file, once per start
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=out, stderr=out
            )

    def signal(self, signum: int) -> None:
        assert self.proc is not None, f"{self.name} never started"
        assert self.proc.returncode is None, f"{self.name} is not up"
        self.proc.send_signal(signum)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@dataclass(slots=True)
class Cluster:
    """A broker and one ``payhook serve`` and one ``payhook consume`` on free loopback ports."""

    workdir: Path
    broker: LocalBroker = field(init=False)
    serve: Process = field(init=False)
    consume: Process = field(init=False)
    env: dict[str, str] = field(init=False)
    http_port: int = field(init=False)
    consumer_port: int = field(init=False)
    topic_prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self.broker = LocalBroker(log_path=self.workdir / "tansu.log")
        self.http_port = free_port()
        self.consumer_port = free_port()
        self.topic_prefix = f"faults{secrets.token_hex(3)}"
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.env = {
            **os.environ,
            "PAYHOOK_SIGNING_KEYS": f"f1:{key}",
            "PAYHOOK_CRYPTOPOS_SECRET": CRYPTOPOS_SECRET,
            "PAYHOOK_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "PAYHOOK_TOPIC_PREFIX": self.topic_prefix,
            "PAYHOOK_HTTP_HOST": "127.0.0.1",
            "PAYHOOK_HTTP_PORT": str(self.http_port),
            "PAYHOOK_CONSUMER_PORT": str(self.consumer_port),
            "PAYHOOK_PUBLIC_URL": f"http://127.0.0.1:{self.http_port}",
            "PAYHOOK_STORE_URL": f"sqlite:///{self.workdir / 'payhook.db'}",
            "PAYHOOK_SPOOL_DIR": str(self.workdir / "spool"),
            "PAYHOOK_LOG_FORMAT": "json",
            "PAYHOOK_PUBLISH_TIMEOUT": "1",
            "PAYHOOK_SHUTDOWN_TIMEOUT": "5",
            "PAYHOOK_CONSUMER_GROUP": f"{self.topic_prefix}-consumer",
            "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            "PAYHOOK_COMMIT_TIMEOUT": "3",
        }
        self.serve = Process("serve", [PAYHOOK, "serve"], self.env, self.workdir / "serve.log")
        self.consume = Process(
            "consume", [PAYHOOK, "consume"], self.env, self.workdir / "consume.log"
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.invoice-events.v1"

    @property
    def db_path(self) -> Path:
        return self.workdir / "payhook.db"

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.broker.start()
        await self.serve.start()
        await self.consume.start()
        await self.wait_serve_ready(http)
        await self.wait_consumer_ready(http)

    async def wait_serve_ready(self, http: aiohttp.ClientSession, within: float = 30) -> None:
        await wait_status(http, f"{self.base_url}/readyz", 200, within, self.serve)

    async def wait_consumer_ready(self, http: aiohttp.ClientSession, within: float = 60) -> None:
        url = f"http://127.0.0.1:{self.consumer_port}/readyz"
        await wait_status(http, url, 200, within, self.consume)

    async def stop(self) -> None:
        for process in (self.serve, self.consume):
            if process.proc is not None and process.proc.returncode is None:
                process.signal(signal.SIGTERM)
                try:
                    await process.wait(15)
                except TimeoutError:
                    await process.kill()
        self.broker.stop()

    def freeze_broker(self) -> None:
        assert self.broker._proc is not None
        os.kill(self.broker._proc.pid, signal.SIGSTOP)

    def thaw_broker(self) -> None:
        assert self.broker._proc is not None
        os.kill(self.broker._proc.pid, signal.SIGCONT)

    async def consumer_duplicates(self, http: aiohttp.ClientSession) -> int:
        """Duplicates the running consumer process dropped (its counter starts at 0)."""
        url = f"http://127.0.0.1:{self.consumer_port}/metrics"
        async with http.get(url) as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith('payhook_consumer_events_total{outcome="duplicate"}'):
                return int(float(line.split()[-1]))
        return 0


async def wait_status(
    http: aiohttp.ClientSession,
    url: str,
    status: int,
    within: float,
    process: Process | None = None,
) -> None:
    """Polls ``url`` until it answers ``status``; fails early if ``process`` exited."""
    deadline = time.monotonic() + within
    while True:
        if process is not None and process.proc is not None:
            code = process.proc.returncode
            assert code is None, f"{process.name} exited with {code} (see {process.log})"
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == status:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"{url} did not answer {status} in {within}s"
        await asyncio.sleep(0.05)


# --- load -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    webhook: Webhook
    status: int | None = None  # None: no HTTP answer (refused, reset, timed out)
    event_id: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Load:
    """Posts webhooks at a steady rate, each on its own schedule slot (a slow answer does not
    slow the rate down). ``outcomes`` fills in as answers arrive."""

    http: aiohttp.ClientSession
    base_url: str
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)

    async def run(self, hooks: Iterable[Webhook]) -> list[Outcome]:
        started = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        batch: list[Outcome] = []
        for n, hook in enumerate(hooks):
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load, not synchronization
            outcome = Outcome(hook)
            batch.append(outcome)
            self.outcomes.append(outcome)
            tasks.append(asyncio.create_task(self._post(outcome)))
        await asyncio.gather(*tasks)
        return batch

    async def _post(self, outcome: Outcome) -> None:
        hook = outcome.webhook
        try:
            async with self.http.post(
                self.base_url + hook.path,
                data=hook.body,
                headers=hook.headers,
                timeout=aiohttp.ClientTimeout(total=20),
            ) as response:
                outcome.status = response.status
                body = await response.read()
                if response.status == 200:
                    outcome.event_id = json.loads(body)["event_id"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.error = type(exc).__name__


# --- what arrived ---------------------------------------------------------------------------


async def read_from_start(
    bootstrap: str,
    topic: str,
    take: Callable[[ConsumerRecord[bytes, bytes]], None],
    done: Callable[[], bool],
    within: float,
) -> None:
    """Reads ``topic`` from the start, every record through ``take``, until ``done()`` holds and
    a poll comes back empty, or until ``within`` seconds passed (the caller reports what is
    missing)."""
    deadline = time.monotonic() + within
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions: set[int] = set()
        while not partitions and time.monotonic() < deadline:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await asyncio.sleep(0.1)  # waiting for the topic's metadata to appear
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        satisfied = False
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            got = 0
            for records in batches.values():
                for record in records:
                    got += 1
                    take(record)
            if satisfied and not got:
                break
            satisfied = done()
    except KafkaError:
        pass  # what was read so far is the answer
    finally:
        await consumer.stop()


async def read_topic(
    bootstrap: str,
    topic: str,
    done: Callable[[collections.Counter[str]], bool],
    within: float,
) -> collections.Counter[str]:
    """How often each event id is on ``topic``, read until ``done(counts)`` holds."""
    counts: collections.Counter[str] = collections.Counter()

    def take(record: ConsumerRecord[bytes, bytes]) -> None:
        counts[dict(record.headers)["event-id"].decode()] += 1

    await read_from_start(bootstrap, topic, take, lambda: done(counts), within)
    return counts


@dataclass(frozen=True, slots=True)
class Stored:
    """The consumer's SQLite store: how often each event was counted, and each settlement."""

    counted: collections.Counter[str]
    paid: dict[str, Decimal | None]  # invoice key -> settlement paid_amount

    @classmethod
    def read(cls, db: Path) -> Stored:
        counted: collections.Counter[str] = collections.Counter()
        paid: dict[str, Decimal | None] = {}
        if not db.exists():
            return cls(counted, paid)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT key, data FROM invoices").fetchall()
        except sqlite3.OperationalError:
            rows = []  # schema not created yet
        finally:
            conn.close()
        for key, data in rows:
            state = _STATE.decode(data)
            counted.update(fact.event_id for fact in state.facts)
            paid[key] = state.settlement.paid_amount
        return cls(counted, paid)


async def wait_stored(db: Path, event_ids: set[str], within: float) -> Stored:
    """Polls the store until every event in ``event_ids`` is counted (or the deadline)."""
    deadline = time.monotonic() + within
    while True:
        stored = await asyncio.to_thread(Stored.read, db)
        if event_ids <= stored.counted.keys() or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.2)


# --- the verdict ----------------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    fault: str
    sent: int
    accepted: int
    found: int
    lost: int
    topic_duplicates: int
    consumer_duplicates: int
    miscounted: int
    problems: list[str]
    # Settlements topic (scale-out scenarios only): records read, and records out of order
    # (a version after a higher one) or republished with other content.
    settlements: int | None = None
    settlement_faults: int | None = None

    ROW: ClassVar[str] = "{:<34} {:>5} {:>5} {:>6} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9}"

    @classmethod
    def header(cls) -> str:
        return cls.ROW.format(
            "fault",
            "sent",
            "2xx",
            "found",
            "lost",
            "dup-topic",
            "dup-consum",
            "miscounted",
            "stl-recs",
            "stl-bad",
        )

    def row(self) -> str:
        return self.ROW.format(
            self.fault,
            self.sent,
            self.accepted,
            self.found,
            self.lost,
            self.topic_duplicates,
            self.consumer_duplicates,
            self.miscounted,
            "-" if self.settlements is None else self.settlements,
            "-" if self.settlement_faults is None else self.settlement_faults,
        )


def judge(
    fault: str,
    outcomes: list[Outcome],
    on_topic: collections.Counter[str],
    stored: Stored,
    consumer_duplicates: int,
) -> Verdict:
    """Every 2xx must be on the topic (``on_topic``: all reads of it, summed) and counted
    exactly once in the store, with the paid amount the invoice's last notification states."""
    accepted = [o for o in outcomes if o.status == 200 and o.event_id is not None]
    problems = [
        f"{o.webhook.key}: HTTP {o.status}" for o in outcomes if o.status not in {200, None}
    ]
    lost = [o for o in accepted if o.event_id not in on_topic]
    final: dict[str, Decimal] = {}
    for o in outcomes:
        final[o.webhook.key] = o.webhook.paid  # posted in order: the last one wins
    miscounted: list[str] = []
    for o in accepted:
        assert o.event_id is not None
        times = stored.counted[o.event_id]
        paid = stored.paid.get(o.webhook.key)
        if times != 1 or paid is None or paid != final[o.webhook.key]:
            miscounted.append(f"{o.webhook.key}: counted {times}x, paid {paid}")
    problems += [f"lost {o.webhook.key} ({o.event_id})" for o in lost] + miscounted
    return Verdict(
        fault=fault,
        sent=len(outcomes),
        accepted=len(accepted),
        found=len(accepted) - len(lost),
        lost=len(lost),
        topic_duplicates=sum(n - 1 for n in on_topic.values() if n > 1),
        consumer_duplicates=consumer_duplicates,
        miscounted=len(miscounted),
        problems=problems,
    )
