"""``make bench`` (mixed): the whole stack under the load a merchant sees, against the floor.

The stack: the local Tansu broker, ``payhook serve`` and ``payhook consume`` on SQLite, each its
own process, all running at once. A constant-rate open-loop load generator (its own process, so
it does not share serve's core) posts valid signed Bitfinex webhooks, each a distinct invoice,
over a new TCP connection per request (``Connection: close``), as providers do. Latency is
counted from the moment a request was due, so a late generator or a stalled server cannot hide
its wait (no coordinated omission).

Per load level (200 and 1,000 webhooks/s, 1 s warm-up then 10 s measured):

- answer: client-seen latency p50 / p99 / max, and serve's own request histogram beside it
  (``/metrics`` scraped before and after; the difference is time spent outside the handler:
  accept, parse, event-loop queueing);
- settlement: from the 2xx as the client saw it to the settlement as an independent reader of
  the settlements topic sees it (p50 / p90 / p99 / max), and the consumer's own
  ``payhook_settlement_latency_seconds`` beside it;
- the floor: a bare aiohttp handler (``bench.ingest``'s) through the same generator.

Each level runs on a stack of its own (``--one-broker``: all on one, one after the other): the
local broker's fetch scans the record batches it holds (0.9 ms of its CPU for a produce and its
fetch on an empty topic, 4.0 ms beside 5,000 one-record batches), so a level measured after
another pays for the other's records, a cost Kafka's indexed log does not have.

Before each level: the consumer's start-up, from ``payhook consume``'s process start to the
first settlement on the topic, beside a bare aiokafka group join (its process start to the
first record) on the same topic with the same session timeout.

Verified: every request answered 200, every accepted event settled (seen by the reader).
Targets (issue 14): at 1,000/s answer p99 <= 25 ms, 2xx -> settlement p50 <= 20 ms and
p99 <= 100 ms; at 200/s settlement p99 <= 50 ms; start-up <= 1 s beyond the group join.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench.ingest import SIGNING_KEYS, cpu_seconds, wait_ready, webhook
from devtools.devbroker import LocalBroker, free_port, stop_process, wait_for_port
from service.ingest.secrets import mint_secret
from service.kafka import ensure_topics
from service.settings import load_settings, parse_signing_keys

RATES: Final = (200, 1000)
WARMUP_SECONDS: Final = 1.0
RUN_SECONDS: Final = 10.0
# Every accepted event must settle within this long after the level's last request.
SETTLE_WITHIN: Final = 15.0
REQUEST_TIMEOUT: Final = 10.0

TARGET_ANSWER_P99_MS: Final = 25.0
TARGET_SETTLE_P50_MS: Final = 20.0
TARGET_SETTLE_P99_MS: Final = 100.0
TARGET_SETTLE_P99_200_MS: Final = 50.0
TARGET_STARTUP_BEYOND_JOIN_S: Final = 1.0


# --- the load generator (its own process) ------------------------------------------------------


class Answer(msgspec.Struct, array_like=True):
    due: float  # seconds after the start of the run the request was due
    latency: float  # due -> the whole answer read, seconds
    answered_at: float  # wall clock (time.time()) when the answer was read
    status: int  # 0: no answer (connection refused, reset, timeout)
    event_id: str
    late: float  # how late the generator started it (its own stalls, not the server's)
    connected: float | None  # due -> the connection established (None: never)


class _Accepted(msgspec.Struct):
    event_id: str = ""


_accepted = msgspec.json.Decoder(_Accepted)


def requests(base: int, count: int) -> list[bytes]:
    """``count`` distinct signed webhooks, invoice numbers from ``base``, each a whole HTTP/1.1
    request that asks the server to close the connection after answering."""
    keys = parse_signing_keys(SIGNING_KEYS)
    built = []
    for i in range(base, base + count):
        order = f"bench-order-{i:06d}"
        token = mint_secret(keys, "bitfinex", order)
        body = webhook(i)
        head = (
            f"POST /v1/webhooks/bitfinex/{order}?token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        built.append(head.encode() + body)
    return built


async def _one(port: int, request: bytes, due: float, started: float) -> Answer:
    status, event_id = 0, ""
    late = time.perf_counter() - due
    connected: float | None = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connected = time.perf_counter() - due
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                status = int(head.split(b" ", 2)[1])
            finally:
                writer.close()
        if status == 200:
            event_id = _accepted.decode(body).event_id
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, msgspec.DecodeError):
        pass
    # perf_counter: uvloop's clock counts whole milliseconds.
    answered = time.perf_counter() - due
    return Answer(due - started, answered, time.time(), status, event_id, late, connected)


async def generate(port: int, rate: float, seconds: float, base: int) -> list[Answer]:
    """Sends ``rate`` requests a second for ``seconds``, each due at its own moment, whatever
    the previous ones are doing (open loop)."""
    count = int(rate * seconds)
    prepared = requests(base, count)
    started = time.perf_counter() + 0.05
    tasks = []
    for i, request in enumerate(prepared):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(port, request, due, started)))
    return list(await asyncio.gather(*tasks))


class Generated(msgspec.Struct):
    answers: list[Answer]
    cpu_seconds: float  # the generator's own


def generator_main(port: int, rate: float, seconds: float, base: int, out: Path) -> None:
    answers = uvloop.run(generate(port, rate, seconds, base))
    used = os.times()
    out.write_bytes(msgspec.json.encode(Generated(answers, used.user + used.system)))


# --- a bare group join (its own process) -------------------------------------------------------


async def bare_join(bootstrap: str, topic: str, group: str, session_ms: int) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 4),
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        while not await consumer.getmany(timeout_ms=100):
            pass
        print("first", flush=True)
    finally:
        await consumer.stop()


# --- the independent reader of the settlements topic ------------------------------------------


class _SettledEvent(msgspec.Struct):
    last_event_id: str


@dataclass(slots=True)
class SettlementReader:
    """Reads the settlements topic from its start and remembers when each event's settlement
    was first seen (wall clock, as the generator's answers)."""

    bootstrap: str
    topic: str
    seen: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=10,
        )
        await consumer.start()
        await consumer.topics()
        partitions = consumer.partitions_for_topic(self.topic) or set()
        consumer.assign([TopicPartition(self.topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        self._consumer = consumer

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        decode = msgspec.json.Decoder(_SettledEvent).decode
        seen = self.seen
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.time()
            for records in batch.values():
                for record in records:
                    assert record.value is not None
                    seen.setdefault(decode(record.value).last_event_id, now)
            if batch:
                self.changed.set()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank over the values that are numbers; NaN when none is."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


Buckets = dict[float, float]  # upper bound -> cumulative count


def scrape(port: int, name: str, **labels: str) -> Buckets:
    """The cumulative buckets of histogram ``name``, summed over the series matching
    ``labels``."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    buckets: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name != f"{name}_bucket":
                continue
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            le = float(sample.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def histogram_quantile(before: Buckets, after: Buckets, q: float) -> float:
    """Prometheus' ``histogram_quantile`` over what was observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return math.nan
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    rate: int
    answers: list[Answer]
    serve_hist: tuple[float, float] = (math.nan, math.nan)
    settle: list[float] = field(default_factory=list)  # seconds, one per accepted event
    unsettled: int = 0
    consume_hist: tuple[float, float] = (math.nan, math.nan)
    # CPU time per request of each process of the stack (us), steadier than latency.
    cpu_us: dict[str, float] = field(default_factory=dict)

    @property
    def measured(self) -> list[Answer]:
        return [a for a in self.answers if a.due >= WARMUP_SECONDS]

    @property
    def failed(self) -> int:
        return sum(a.status != 200 for a in self.measured)

    def answer_ms(self, q: float) -> float:
        return percentile([a.latency for a in self.measured], q) * 1000

    def late_ms(self, q: float) -> float:
        return percentile([a.late for a in self.measured], q) * 1000

    def connected_ms(self, q: float) -> float:
        return percentile([a.connected for a in self.measured if a.connected is not None], q) * 1000

    def settle_ms(self, q: float) -> float:
        return percentile(self.settle, q) * 1000


def _take(path: Path) -> bytes:
    try:
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


async def run_generator(port: int, rate: int, seconds: float, base: int) -> Generated:
    handle, name = tempfile.mkstemp(prefix="payhook-bench-answers-", suffix=".json")
    os.close(handle)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.mixed",
        "--generate",
        str(port),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--base",
        str(base),
        "--out",
        name,
    )
    await process.wait()
    out = _take(Path(name))
    if process.returncode != 0:
        raise SystemExit(f"load generator failed ({process.returncode})")
    try:
        return msgspec.json.decode(out, type=Generated)
    except msgspec.DecodeError as exc:
        raise SystemExit(f"load generator: {len(out)} bytes of output: {exc}") from None


async def settled(
    reader: SettlementReader, answers: Iterable[Answer], within: float
) -> tuple[list[float], int]:
    """Waits until every accepted event's settlement was seen (at most ``within``); the 2xx ->
    settlement times of the measured ones, and how many never settled."""
    accepted = [a for a in answers if a.status == 200 and a.event_id]
    deadline = time.monotonic() + within
    while any(a.event_id not in reader.seen for a in accepted):
        reader.changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await reader.changed.wait()
    times = [
        reader.seen[a.event_id] - a.answered_at
        for a in accepted
        if a.due >= WARMUP_SECONDS and a.event_id in reader.seen
    ]
    return times, sum(a.event_id not in reader.seen for a in accepted)


def _own_cpu() -> float:
    used = os.times()
    return used.user + used.system


async def measure_payhook(
    http_port: int,
    consumer_port: int,
    reader: SettlementReader,
    rate: int,
    base: int,
    pids: dict[str, int],
) -> Level:
    histogram = "payhook_http_request_duration_seconds"
    e2e = "payhook_settlement_latency_seconds"
    serve_before = scrape(http_port, histogram, outcome="accepted")
    consume_before = scrape(consumer_port, e2e)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own_before = _own_cpu()
    generated = await run_generator(http_port, rate, WARMUP_SECONDS + RUN_SECONDS, base)
    answers = generated.answers
    serve_after = scrape(http_port, histogram, outcome="accepted")
    times, unsettled = await settled(reader, answers, SETTLE_WITHIN)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    cpu["generator"] = generated.cpu_seconds
    cpu["reader"] = _own_cpu() - own_before
    consume_after = scrape(consumer_port, e2e)
    return Level(
        name="payhook",
        rate=rate,
        answers=answers,
        serve_hist=(
            histogram_quantile(serve_before, serve_after, 0.5) * 1000,
            histogram_quantile(serve_before, serve_after, 0.99) * 1000,
        ),
        settle=times,
        unsettled=unsettled,
        consume_hist=(
            histogram_quantile(consume_before, consume_after, 0.5) * 1000,
            histogram_quantile(consume_before, consume_after, 0.99) * 1000,
        ),
        cpu_us={name: used / len(answers) * 1e6 for name, used in cpu.items()},
    )


async def measure_startup(
    bootstrap: str,
    topic: str,
    session_ms: int,
    consume: list[str],
    env: dict[str, str],
    reader: SettlementReader,
    log: Path,
) -> tuple[float, float, subprocess.Popen[bytes]]:
    """(bare join: process start -> first record, payhook consume: process start -> first
    settlement, the consume process). Events must be on ``topic`` already."""
    started = time.perf_counter()
    joiner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.mixed",
        "--join",
        bootstrap,
        topic,
        f"bench-bare-join-{os.getpid()}",
        str(session_ms),
        stdout=asyncio.subprocess.PIPE,
    )
    assert joiner.stdout is not None
    line = await joiner.stdout.readline()
    join = time.perf_counter() - started
    await joiner.wait()
    if line.strip() != b"first":
        raise SystemExit("bare group join failed")

    launched = time.time()
    process = launch(consume, env, log)
    reader.changed.clear()
    try:
        async with asyncio.timeout(60):
            await reader.changed.wait()
    except TimeoutError:
        stop_process(process, grace=10)
        raise SystemExit("payhook consume published no settlement") from None
    return join, min(reader.seen.values()) - launched, process


# --- the run ---------------------------------------------------------------------------------


def launch(command: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    """Starts a process of the stack, its stderr (the JSON log lines) to ``log``."""
    if log is None:
        return subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stderr=out)


def _ms(value: float) -> str:
    return f"{value:8.1f}" if not math.isnan(value) else f"{'-':>8}"


@dataclass(frozen=True, slots=True)
class Startup:
    join: float  # a bare group join: process start -> first record, seconds
    first_settlement: float  # payhook consume: process start -> first settlement, seconds

    @property
    def beyond(self) -> float:
        return self.first_settlement - self.join


@dataclass(frozen=True, slots=True)
class Floor:
    """The floor's process (a bare aiohttp handler), shared by every stack."""

    pid: int
    port: int

    async def measure(self, rate: int) -> Level:
        before = cpu_seconds(self.pid)
        generated = await run_generator(self.port, rate, WARMUP_SECONDS + RUN_SECONDS, 0)
        used = {"floor": cpu_seconds(self.pid) - before, "generator": generated.cpu_seconds}
        count = len(generated.answers)
        return Level(
            name="floor",
            rate=rate,
            answers=generated.answers,
            cpu_us={name: cpu / count * 1e6 for name, cpu in used.items()},
        )


async def main(rates: Sequence[int], one_broker: bool) -> int:
    """Each level on a stack of its own (``one_broker``: all levels on one), the floor's
    process shared."""
    work = Path(tempfile.mkdtemp(prefix="payhook-bench-mixed-"))
    levels: list[Level] = []
    startups: list[Startup] = []
    floor_port = free_port()
    process = launch(
        [sys.executable, "-m", "bench.ingest", "--floor", str(floor_port)], dict(os.environ), None
    )
    floor = Floor(process.pid, floor_port)
    try:
        wait_for_port(floor_port, timeout=20)
        await run_generator(floor_port, 200, 2.0, 0)  # its warm-up
        stacks = [list(rates)] if one_broker else [[rate] for rate in rates]
        for stack_rates in stacks:
            stack_work = Path(tempfile.mkdtemp(prefix="stack-", dir=work))
            startups.append(await measure_stack(stack_work, stack_rates, floor, levels))
    finally:
        stop_process(process, grace=30)
    shutil.rmtree(work, ignore_errors=True)
    return report(levels, startups, one_broker)


async def measure_stack(
    work: Path, rates: Sequence[int], floor: Floor, levels: list[Level]
) -> Startup:
    """Starts a local broker, serve, consume and the reader, measures the consumer's start-up,
    then each of ``rates`` (payhook, then the floor), appending to ``levels``."""
    with LocalBroker(log_path=work / "tansu.log") as broker:
        http_port, consumer_port = free_port(), free_port()
        env = {
            **os.environ,
            "PAYHOOK_KAFKA_BOOTSTRAP": broker.bootstrap,
            "PAYHOOK_HTTP_PORT": str(http_port),
            "PAYHOOK_CONSUMER_PORT": str(consumer_port),
            "PAYHOOK_SIGNING_KEYS": SIGNING_KEYS,
            "PAYHOOK_TOPIC_PREFIX": "bench-mixed",
            "PAYHOOK_SPOOL_DIR": str(work / "spool"),
            "PAYHOOK_STORE_URL": f"sqlite:///{work / 'payhook.db'}",
            "PAYHOOK_LOG_FORMAT": "json",
        }
        settings = load_settings(env)
        problems = {t: p for t, p in (await ensure_topics(settings)).items() if p}
        if problems:
            raise SystemExit(f"bench: topics: {problems}")
        payhook = [sys.executable, "-m", "service.cli"]
        serve = launch([*payhook, "serve"], env, work / "serve.log")
        consume: subprocess.Popen[bytes] | None = None
        reader = SettlementReader(broker.bootstrap, settings.settlements_topic)
        reading: asyncio.Task[None] | None = None
        try:
            wait_ready(f"http://127.0.0.1:{http_port}/readyz")
            await reader.start()
            reading = asyncio.create_task(reader.run())
            # Events on the topic before the consumer starts: its first settlement is then
            # its start-up, not the wait for a webhook. Serve warms up meanwhile.
            warm = (await run_generator(http_port, 200, 2.0, 0)).answers
            join, first_settlement, consume = await measure_startup(
                broker.bootstrap,
                settings.events_topic,
                settings.consumer_session_timeout_ms,
                [*payhook, "consume"],
                env,
                reader,
                work / "consume.log",
            )
            _, unsettled = await settled(reader, warm, SETTLE_WITHIN)
            if unsettled:
                raise SystemExit(f"{unsettled} warm-up events never settled")
            pids = {"serve": serve.pid, "consume": consume.pid, "broker": broker.pid or 0}
            for rate in rates:
                # Invoice numbers of a level's own (the warm-up's start at 0).
                base = (len(levels) + 1) * 100_000
                levels.append(
                    await measure_payhook(http_port, consumer_port, reader, rate, base, pids)
                )
                levels.append(await floor.measure(rate))
        finally:
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
            await reader.stop()
            stop_process(serve, grace=30)
            if consume is not None:
                stop_process(consume, grace=30)
    return Startup(join, first_settlement)


def report(levels: Sequence[Level], startups: Sequence[Startup], one_broker: bool) -> int:
    stacks = "all levels on one stack" if one_broker else "each level on a fresh stack"
    print(
        f"mixed workload: local broker + payhook serve + payhook consume (SQLite), one new "
        f"connection per request, open loop; {RUN_SECONDS:.0f}s per level after "
        f"{WARMUP_SECONDS:.0f}s warm-up, {stacks}; the floor through the same generator"
    )
    print(
        f"{'':15}{'':>8}{'answer (client) ms':^24}{'serve hist ms':^16}"
        f"{'2xx -> settlement (reader) ms':^38}{'consume hist':^16}"
    )
    print(
        f"{'load':<15}{'non-200':>8}{'p50':>8}{'p99':>8}{'max':>8}"
        f"{'p50':>8}{'p99':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'lost':>6}"
        f"{'p50':>8}{'p99':>8}"
    )
    for level in levels:
        line = (
            f"{f'{level.rate}/s {level.name}':<15}{level.failed:>8}"
            f"{_ms(level.answer_ms(0.5))}{_ms(level.answer_ms(0.99))}{_ms(level.answer_ms(1.0))}"
        )
        if level.name == "payhook":
            line += (
                f"{_ms(level.serve_hist[0])}{_ms(level.serve_hist[1])}"
                f"{_ms(level.settle_ms(0.5))}{_ms(level.settle_ms(0.9))}"
                f"{_ms(level.settle_ms(0.99))}{_ms(level.settle_ms(1.0))}{level.unsettled:>6}"
                f"{_ms(level.consume_hist[0])}{_ms(level.consume_hist[1])}"
            )
        print(line)
    for level in levels:
        used = ", ".join(f"{name} {us:.0f}" for name, us in level.cpu_us.items())
        print(
            f"{level.rate}/s {level.name}: CPU us per request: {used}; the generator late "
            f"p99 {level.late_ms(0.99):.1f} ms; connected p50/p99 {level.connected_ms(0.5):.1f}"
            f"/{level.connected_ms(0.99):.1f} ms"
        )
    for startup in startups:
        print(
            f"consumer start-up: process start -> first settlement "
            f"{startup.first_settlement:.2f}s; a bare group join (process start -> first "
            f"record) {startup.join:.2f}s; beyond the join {startup.beyond:.2f}s "
            f"(target <= {TARGET_STARTUP_BEYOND_JOIN_S:.0f}s)"
        )
    beyond = max(startup.beyond for startup in startups)
    by_rate = {level.rate: level for level in levels if level.name == "payhook"}
    checks: list[tuple[str, bool]] = [
        (f"start-up beyond join <= {TARGET_STARTUP_BEYOND_JOIN_S}s", beyond <= 1.0)
    ]
    if 1000 in by_rate:
        busy = by_rate[1000]
        checks += [
            (f"1000/s answer p99 <= {TARGET_ANSWER_P99_MS}", busy.answer_ms(0.99) <= 25.0),
            (f"1000/s settlement p50 <= {TARGET_SETTLE_P50_MS}", busy.settle_ms(0.5) <= 20.0),
            (f"1000/s settlement p99 <= {TARGET_SETTLE_P99_MS}", busy.settle_ms(0.99) <= 100.0),
        ]
    if 200 in by_rate:
        checks.append(
            (
                f"200/s settlement p99 <= {TARGET_SETTLE_P99_200_MS}",
                by_rate[200].settle_ms(0.99) <= TARGET_SETTLE_P99_200_MS,
            )
        )
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
    verified = all(level.failed == 0 and level.unsettled == 0 for level in levels)
    print(
        f"verified (every request 200, every accepted event settled): {'yes' if verified else 'NO'}"
    )
    return 0 if verified else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--generate", type=int, metavar="PORT", help="be the load generator")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=RUN_SECONDS)
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the generator writes its answers")
    parser.add_argument("--join", nargs=4, metavar=("BOOTSTRAP", "TOPIC", "GROUP", "SESSION_MS"))
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    parser.add_argument(
        "--one-broker",
        action="store_true",
        help="all levels on one stack, one after the other (the local broker's fetches then "
        "cost more at each level: it scans the record batches it holds)",
    )
    args = parser.parse_args()
    if args.generate:
        generator_main(args.generate, args.rate, args.seconds, args.base, args.out)
    elif args.join:
        bootstrap, topic, group, session_ms = args.join
        asyncio.run(bare_join(bootstrap, topic, group, int(session_ms)))
    else:
        sys.exit(asyncio.run(main(args.rates, args.one_broker)))
