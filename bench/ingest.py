"""``make bench`` (ingest): ``payhook serve`` against the floor, under the same load.

Both servers run as their own processes on loopback; wrk (a separate C process, one thread,
64 connections) posts valid signed Bitfinex webhooks, each to its own order, for a fixed time:
many distinct webhooks in rotation (1,000 by default), then few (8), both through the same
processes (``--webhooks``).

- payhook: the real ``payhook serve`` with the local Tansu broker (acks=all, JSON logs to a
  file, the spool configured as in production).
- floor: a bare aiohttp handler that only reads the body and answers 200, on asyncio's own
  event loop (``--floor-loop uvloop`` gives it the loop payhook serve runs on).

Both run side by side, each on the same core of its own (the load generator, the broker and
this process on the other), and the load alternates between them: after 3 s of warm-up each,
three rounds (``--rounds``), each of five 2 s slices per side, payhook then the floor in turn
(10 s measured per side and round). Printed per round: accepted/s, p50 (the slices' median) and
p99 (the worst slice's), the server's CPU time per request (and the broker's, for payhook), and
payhook/floor with its standard error from the five slice pairs. Verified: every request was
answered 200, and every event payhook accepted is on the topic (counted by reading it back).
Targets, in every round: payhook >= 50% of the floor's throughput and p99 <= 25 ms; and no more
slowdown from one round to the next than the floor's in the same run.

That last target is judged on the payhook/floor ratio: from one round to the next, and from
the first to the last, it may not drop by more than the run resolves (three standard errors of
the drop; see ``RESOLUTION_SE``). Each side's largest drop is printed too. Why not compare
those two drops directly: throughput on this shared 2-core machine moves by 3-8% from one 10 s
stretch to the next with nothing changing, for both sides alike (ten rounds of whole 10 s
turns: payhook's and the floor's throughput correlate at 0.75, each varies by ~4%); with one
sample per side and round, "payhook's largest drop <= the floor's" then fails about every other
run for a server exactly as steady as the floor, and passes for one that creeps, if the machine
happens to slow the floor's round more. Alternating slices within a round make both sides'
rounds see the same machine, and the slices measure how far the ratio can be trusted; a payhook
that gets slower as it runs moves the ratio, whatever the machine does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import uvloop
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from devtools.devbroker import LocalBroker, free_port, stop_process, wait_for_port
from service.ingest.secrets import mint_secret
from service.kafka import ensure_topics
from service.settings import load_settings, parse_signing_keys

CONNECTIONS: Final = 64
WARMUP_SECONDS: Final = 3
SLICES: Final = 5  # per side and round, alternating
SLICE_SECONDS: Final = 2
RUN_SECONDS: Final = SLICES * SLICE_SECONDS  # measured per side and round
WEBHOOKS: Final = (1000, 8)  # distinct webhooks in rotation: many, then few
SIGNING_KEYS: Final = "bench:" + base64.b64encode(b"b" * 32).decode()
TARGET_RATIO: Final = 0.5
TARGET_P99_MS: Final = 25.0


# --- the floor ---------------------------------------------------------------------------------


async def _floor_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "accepted"})


def floor_main(port: int, loop: str) -> None:
    app = web.Application()
    app.router.add_post("/v1/webhooks/{provider}/{order_id}", _floor_handler)
    event_loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=event_loop)


# --- load ------------------------------------------------------------------------------------


def webhook(i: int) -> bytes:
    """A Bitfinex COMPLETED webhook shaped like seed 003, customer data included."""
    return json.dumps(
        {
            "id": f"bench-invoice-{i:06d}",
            "type": "ECOMMERCE",
            "orderId": f"bench-order-{i:06d}",
            "status": "COMPLETED",
            "amount": 2.5,
            "currency": "USD",
            "t": 1612460165497 + i,
            "invoices": [
                {
                    "amount": 0.00006262,
                    "currency": "BTC",
                    "payCurrency": "BTC",
                    "poolCurrency": "BTC",
                    "address": "bc1qyegkyyk656vrqp0pzyg8p4yy9xlqfhxlrg0jtf",
                }
            ],
            "payment": {
                "txid": f"{i:064x}",
                "amount": 0.00006262,
                "currency": "BTC",
                "method": "BITCOIN",
                "status": "COMPLETED",
                "confirmations": 6,
                "created_at": "2021-01-06 21:16:28",
                "updated_at": "2021-01-06 21:16:28",
                "depositId": 1357996 + i,
            },
            "customerInfo": {"fullName": "Bench Customer", "email": "bench@example.com"},
        }
    ).encode()


def lua_script(webhooks: int) -> str:
    """wrk cycles through ``webhooks`` prebuilt requests, each with its order's own token."""
    keys = parse_signing_keys(SIGNING_KEYS)
    rows = []
    for i in range(webhooks):
        order = f"bench-order-{i:06d}"
        token = mint_secret(keys, "bitfinex", order)
        body = webhook(i).decode()
        assert "]==]" not in body
        rows.append(f'  {{"/v1/webhooks/bitfinex/{order}?token={token}", [==[{body}]==]}},')
    return "\n".join(
        [
            "local rows = {",
            *rows,
            "}",
            "local reqs = {}",
            "local n = 0",
            "init = function(args)",
            '  local headers = {["Content-Type"] = "application/json"}',
            "  for i, row in ipairs(rows) do",
            '    reqs[i] = wrk.format("POST", row[1], headers, row[2])',
            "  end",
            "end",
            "request = function()",
            "  n = n % #reqs + 1",
            "  return reqs[n]",
            "end",
            "done = function(summary, latency, requests)",
            "  local e = summary.errors",
            '  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests,',
            "    summary.duration, latency:percentile(50), latency:percentile(99),",
            "    e.status, e.connect + e.read + e.write + e.timeout))",
            "end",
        ]
    )


@dataclass(frozen=True, slots=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_200: int
    socket_errors: int
    # The server's CPU time per request: steadier than throughput on a shared machine.
    cpu_us: float = float("nan")
    # The broker's CPU time per request, for payhook's rounds (NaN for the floor's).
    broker_cpu_us: float = float("nan")

    @property
    def per_second(self) -> float:
        # wrk counts socket errors apart from the requests it completed: never below zero.
        return max(0, self.requests - self.non_200 - self.socket_errors) / self.seconds


WRK: Final = shutil.which("wrk") or "/usr/bin/wrk"


def wrk(port: int, script: Path, seconds: int) -> Load:
    out = subprocess.run(
        [
            WRK,
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, micros, p50, p99, non_200, errors = (int(v) for v in line.split()[1:])
    return Load(requests, micros / 1e6, p50 / 1000, p99 / 1000, non_200, errors)


# --- processes ---------------------------------------------------------------------------------


def wait_ready(url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {within}s")
        time.sleep(0.05)


def accepted_in(log: Path) -> tuple[int, set[str]]:
    """How many requests payhook answered 200, and their event ids, from its request log lines
    (read after it stopped: requests wrk abandoned at the end of a run are still answered)."""
    count = 0
    ids: set[str] = set()
    for line in log.read_bytes().splitlines():
        if not line.startswith(b"{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "request" and entry.get("status") == 200 and entry.get("event_id"):
            count += 1
            ids.add(entry["event_id"])
    return count, ids


async def read_event_ids(
    bootstrap: str, topic: str, expected: int, within: float = 60.0
) -> tuple[int, set[str], int]:
    """Reads the whole topic (Tansu's high watermark is not to be trusted): the record count,
    the distinct ``event-id`` headers, and how many records are not on the partition the
    default partitioner gives their key (per-invoice order depends on it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    count = 0
    misplaced = 0
    ids: set[str] = set()
    partitioner = DefaultPartitioner()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        ordered = sorted(partitions)
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + within
        idle = 0
        # Reads until the expected count, then until a few empty polls prove nothing more.
        while time.monotonic() < deadline and (count < expected or idle < 3):
            batches = await consumer.getmany(timeout_ms=300, max_records=10000)
            got = 0
            for tp, batch in batches.items():
                got += len(batch)
                ids.update(dict(r.headers)["event-id"].decode() for r in batch)
                misplaced += sum(
                    partitioner(r.key, ordered, ordered) != tp.partition for r in batch
                )
            count += got
            idle = 0 if got else idle + 1
    finally:
        await consumer.stop()
    return count, ids, misplaced


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, script: Path, pid: int, broker_pid: int | None = None) -> Load:
    """One slice: ``SLICE_SECONDS`` of load, with the server's (and the broker's) CPU time."""
    before = cpu_seconds(pid)
    broker_before = cpu_seconds(broker_pid) if broker_pid else float("nan")
    load = wrk(port, script, SLICE_SECONDS)
    used = cpu_seconds(pid) - before
    broker_used = cpu_seconds(broker_pid) - broker_before if broker_pid else float("nan")
    requests = max(1, load.requests)
    return dataclasses.replace(
        load, cpu_us=used / requests * 1e6, broker_cpu_us=broker_used / requests * 1e6
    )


def combined(slices: Sequence[Load]) -> Load:
    """A round's figures from its slices: counts and times add up, CPU time is per request of
    the whole round, p50 is the slices' median and p99 the worst slice's (wrk gives no
    histogram to merge; the worst is the stricter figure)."""
    requests = sum(x.requests for x in slices)

    def per_request(field: str) -> float:
        total = sum(getattr(x, field) * x.requests for x in slices)
        return float(total / max(1, requests))

    return Load(
        requests=requests,
        seconds=sum(x.seconds for x in slices),
        p50_ms=statistics.median(x.p50_ms for x in slices),
        p99_ms=max(x.p99_ms for x in slices),
        non_200=sum(x.non_200 for x in slices),
        socket_errors=sum(x.socket_errors for x in slices),
        cpu_us=per_request("cpu_us"),
        broker_cpu_us=per_request("broker_cpu_us"),
    )


@dataclass(frozen=True, slots=True)
class Round:
    """One round: ``SLICES`` slices of each side, alternating (payhook, floor, payhook, ...)."""

    payhook: list[Load]
    floor: list[Load]

    @property
    def ratio(self) -> float:
        floor = combined(self.floor).per_second
        return combined(self.payhook).per_second / floor if floor else 0.0

    @property
    def ratio_error(self) -> float:
        """The relative standard error of :attr:`ratio`, from the spread of the slices' own
        payhook/floor ratios (each slice pair ran within seconds of each other)."""
        pairs = zip(self.payhook, self.floor, strict=True)
        ratios = [p.per_second / f.per_second for p, f in pairs if f.per_second]
        if len(ratios) < max(2, len(self.floor)) or not any(ratios):
            return float("inf")  # one slice, a slice the floor did not answer, or no payhook
        return statistics.stdev(ratios) / statistics.mean(ratios) / math.sqrt(len(ratios))


def start_floor(floor_loop: str, cores: set[int]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", "--floor", str(port), "--floor-loop", floor_loop],
        stderr=subprocess.DEVNULL,
    )
    os.sched_setaffinity(floor.pid, cores)
    return floor, port


def split_cores() -> tuple[set[int], set[int]]:
    """The core the two servers take turns on, and the cores of everything else (the load
    generator, the broker, this process): with the servers on a core of their own, neither
    the scheduler's moves nor the generator's work land on one side's rounds more than the
    other's. Everything shares the cores on a machine with only one."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        return cores, cores
    server = max(cores)
    return {server}, cores - {server}


def slowdown(loads: list[Load]) -> float:
    """The largest drop in throughput from one round to the next (0.1: 10% slower; 0 when no
    round was slower than the one before)."""
    drops = [1 - b.per_second / a.per_second for a, b in itertools.pairwise(loads)]
    return max([0.0, *drops])


# A drop of the ratio is judged against this many standard errors of it: with five slice pairs
# a round (8 degrees of freedom) a one-sided t quantile of about 1% per comparison, so that a
# payhook exactly as steady as the floor fails a run of two rotations (three comparisons each)
# about once in twenty (at 2 standard errors it was about once in six, simulated).
RESOLUTION_SE: Final = 3.0


@dataclass(frozen=True, slots=True)
class Excess:
    """Payhook's slowdown beyond the floor's between two rounds (the drop of the payhook/floor
    ratio), and what the run resolves: ``RESOLUTION_SE`` standard errors of that drop."""

    first: int  # round numbers, from 1
    second: int
    slowdown: float
    resolution: float

    @property
    def met(self) -> bool:
        """Within what the run resolves; a run that resolves nothing (a round without slices
        of both sides that answered) is not counted as met."""
        return math.isfinite(self.resolution) and self.slowdown <= self.resolution


def excess_slowdowns(rounds: Sequence[Round]) -> list[Excess]:
    """From each round to the next, and from the first to the last (a creep too small to
    resolve between neighbours adds up there)."""
    pairs = list(itertools.pairwise(range(len(rounds))))
    if len(rounds) > 2:
        pairs.append((0, len(rounds) - 1))
    excesses = []
    for i, j in pairs:
        a, b = rounds[i], rounds[j]
        if a.ratio > 0:
            slowdown = 1 - b.ratio / a.ratio
            resolution = RESOLUTION_SE * math.hypot(a.ratio_error, b.ratio_error)
        else:
            slowdown, resolution = 0.0, math.inf
        excesses.append(Excess(i + 1, j + 1, slowdown, resolution))
    return excesses


def report(webhooks: int, rounds: list[Round]) -> bool:
    """Prints one rotation's rounds; True when its targets are met."""
    results = [(combined(r.payhook), combined(r.floor)) for r in rounds]
    ratios = [r.ratio for r in rounds]
    worst_p99 = max(payhook.p99_ms for payhook, _ in results)
    print(f"{webhooks} distinct webhooks in rotation:")
    print(
        f"{'':11}{'accepted/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'non-200':>8}{'errors':>7}"
        f"{'cpu us/req':>11}{'broker':>7}{'ratio':>12}"
    )
    for number, ((payhook, floor), r) in enumerate(zip(results, rounds, strict=True)):
        for name, load in ((f"payhook {number + 1}", payhook), (f"floor {number + 1}", floor)):
            extra = (
                f"{load.broker_cpu_us:7.0f}{r.ratio:6.2f} ±{r.ratio_error:4.1%}"
                if load is payhook
                else ""
            )
            print(
                f"{name:11}{load.per_second:11.0f}{load.p50_ms:8.2f}{load.p99_ms:8.2f}"
                f"{load.non_200:8d}{load.socket_errors:7d}{load.cpu_us:11.0f}{extra}"
            )
    excesses = excess_slowdowns(rounds)
    worst = max(excesses, key=lambda e: e.slowdown - e.resolution, default=None)
    beyond = (
        f"{worst.slowdown:.1%} from round {worst.first} to {worst.second} "
        f"(this run resolves {worst.resolution:.1%})"
        if worst
        else "-"
    )
    print(
        f"  ratio payhook/floor: worst {min(ratios):.2f}, median {statistics.median(ratios):.2f} "
        f"(target >= {TARGET_RATIO} in every round); payhook p99: worst {worst_p99:.2f} ms "
        f"(target <= {TARGET_P99_MS})\n"
        f"  largest slowdown from one round to the next: payhook "
        f"{slowdown([p for p, _ in results]):.1%}, floor {slowdown([f for _, f in results]):.1%}; "
        f"payhook's beyond the floor's between two rounds, nearest its bound: {beyond} "
        f"(target: none beyond what the run resolves)"
    )
    return (
        min(ratios) >= TARGET_RATIO and worst_p99 <= TARGET_P99_MS and all(e.met for e in excesses)
    )


def main(floor_loop: str, rounds: int, rotations: Sequence[int]) -> int:
    if not Path(WRK).exists():
        print("bench: wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="payhook-bench-"))
    server_cores, other_cores = split_cores()
    os.sched_setaffinity(0, other_cores)  # the broker and wrk, started from here, inherit it
    results: dict[int, list[Round]] = {}
    with LocalBroker(log_path=work / "tansu.log") as broker:
        http_port = free_port()
        env = {
            **os.environ,
            "PAYHOOK_KAFKA_BOOTSTRAP": broker.bootstrap,
            "PAYHOOK_HTTP_PORT": str(http_port),
            "PAYHOOK_SIGNING_KEYS": SIGNING_KEYS,
            "PAYHOOK_TOPIC_PREFIX": "bench",
            "PAYHOOK_SPOOL_DIR": str(work / "spool"),
            "PAYHOOK_LOG_FORMAT": "json",
        }
        settings = load_settings(env)
        problems = {t: p for t, p in asyncio.run(ensure_topics(settings)).items() if p}
        if problems:
            print(f"bench: topics: {problems}", file=sys.stderr)
            return 1

        with open(work / "serve.log", "wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"], env=env, stderr=log
            )
        os.sched_setaffinity(serve.pid, server_cores)
        floor, floor_port = start_floor(floor_loop, server_cores)
        try:
            wait_ready(f"http://127.0.0.1:{http_port}/readyz")
            wait_for_port(floor_port, timeout=20)
            for webhooks in rotations:
                script = work / f"webhooks-{webhooks}.lua"
                script.write_text(lua_script(webhooks))
                wrk(http_port, script, WARMUP_SECONDS)
                wrk(floor_port, script, WARMUP_SECONDS)
                # Slices alternate within a round: what slows the machine for a few seconds
                # slows both sides' round, not one side's.
                for _ in range(rounds):
                    payhook: list[Load] = []
                    floor_slices: list[Load] = []
                    for _ in range(SLICES):
                        payhook.append(measure(http_port, script, serve.pid, broker.pid))
                        floor_slices.append(measure(floor_port, script, floor.pid))
                    results.setdefault(webhooks, []).append(Round(payhook, floor_slices))
        finally:
            stop_process(floor, grace=30)
            stop_process(serve, grace=30)
        answered, accepted = accepted_in(work / "serve.log")
        records, on_topic, misplaced = asyncio.run(
            read_event_ids(broker.bootstrap, settings.events_topic, answered)
        )
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"ingest benchmark: {CONNECTIONS} connections, wrk -t1, {WARMUP_SECONDS}s warm-up; "
        f"floor on {floor_loop}'s event loop; {rounds} rounds of {SLICES} alternating "
        f"{SLICE_SECONDS}s slices per side ({RUN_SECONDS}s measured per side and round)"
    )
    met = all([report(webhooks, loads) for webhooks, loads in results.items()])
    missing = accepted - on_topic
    print(
        f"answered 200 by payhook (warm-up included): {answered} ({len(accepted)} distinct "
        f"events); records on the topic: {records} ({len(on_topic)} distinct); "
        f"missing: {len(missing)}; on another partition than their key's: {misplaced}"
    )
    ok = (
        all(
            load.non_200 == 0 and load.socket_errors == 0
            for rounds_ in results.values()
            for r in rounds_
            for load in (*r.payhook, *r.floor)
        )
        and records == answered
        and not missing
        and not misplaced
    )
    print(f"verified: {'yes' if ok else 'NO'}; targets met: {'yes' if met else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--floor", type=int, help="run the floor server on this port")
    parser.add_argument(
        "--floor-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the floor's event loop (payhook serve runs on uvloop)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="payhook-then-floor rounds")
    parser.add_argument(
        "--webhooks",
        type=int,
        nargs="+",
        default=list(WEBHOOKS),
        help="distinct webhooks in rotation, one set of rounds for each",
    )
    args = parser.parse_args()
    if args.floor:
        floor_main(args.floor, args.floor_loop)
    else:
        sys.exit(main(args.floor_loop, args.rounds, args.webhooks))
