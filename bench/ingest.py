"""``make bench`` (ingest): ``payhook serve`` against the floor, under the same load.

Both servers run as their own processes on loopback; wrk (a separate C process, one thread,
64 connections) posts valid signed Bitfinex webhooks, each to its own order, for a fixed time:
many distinct webhooks in rotation (1,000 by default), then few (8), both through the same
processes (``--webhooks``).

- payhook: the real ``payhook serve`` with the local Tansu broker (acks=all, JSON logs to a
  file, the spool configured as in production).
- floor: a bare aiohttp handler that only reads the body and answers 200, on asyncio's own
  event loop (``--floor-loop uvloop`` gives it the loop payhook serve runs on).

Both run side by side, and the load alternates between them: three rounds (``--rounds``) of
payhook then the floor, each 3 s of warm-up and 10 s measured. Printed per round: accepted/s,
p50 and p99, the server's CPU time per request, and payhook/floor; then the ratio of every round,
the worst p99, and each side's largest slowdown from one round to the next. Verified: every
request was answered 200, and every event payhook accepted is on the topic (counted by reading
it back). Targets, in every round: payhook >= 50% of the floor's throughput and p99 <= 25 ms;
and no more slowdown from round to round than the floor's in the same run.

Throughput on this shared 2-core machine moves with whatever else runs (the floor alone moved
by a quarter from one round to the next in one run); the CPU time per request is the steadier
figure, and a slowdown that payhook shows and the floor does not is payhook's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import json
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
RUN_SECONDS: Final = 10
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

    @property
    def per_second(self) -> float:
        return (self.requests - self.non_200 - self.socket_errors) / self.seconds


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


def measure(port: int, script: Path, pid: int) -> Load:
    wrk(port, script, WARMUP_SECONDS)
    before = cpu_seconds(pid)
    load = wrk(port, script, RUN_SECONDS)
    used = cpu_seconds(pid) - before
    return dataclasses.replace(load, cpu_us=used / max(1, load.requests) * 1e6)


def start_floor(floor_loop: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", "--floor", str(port), "--floor-loop", floor_loop],
        stderr=subprocess.DEVNULL,
    )
    return floor, port


def slowdown(loads: list[Load]) -> float:
    """The largest drop in throughput from one round to the next (0.1: 10% slower; 0 when no
    round was slower than the one before)."""
    drops = [1 - b.per_second / a.per_second for a, b in itertools.pairwise(loads)]
    return max([0.0, *drops])


def report(webhooks: int, results: list[tuple[Load, Load]]) -> bool:
    """Prints one rotation's rounds; True when its targets are met."""
    ratios = [payhook.per_second / floor.per_second for payhook, floor in results]
    worst_p99 = max(payhook.p99_ms for payhook, _ in results)
    print(f"{webhooks} distinct webhooks in rotation:")
    print(
        f"{'':10}{'accepted/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}{'errors':>8}"
        f"{'cpu us/req':>12}{'ratio':>8}"
    )
    for number, ((payhook, floor), round_ratio) in enumerate(zip(results, ratios, strict=True)):
        for name, load in ((f"payhook {number + 1}", payhook), (f"floor {number + 1}", floor)):
            ratio_column = f"{round_ratio:8.2f}" if load is payhook else ""
            print(
                f"{name:10}{load.per_second:12.0f}{load.p50_ms:9.2f}{load.p99_ms:9.2f}"
                f"{load.non_200:9d}{load.socket_errors:8d}{load.cpu_us:12.0f}{ratio_column}"
            )
    payhook_slower = slowdown([payhook for payhook, _ in results])
    floor_slower = slowdown([floor for _, floor in results])
    print(
        f"  ratio payhook/floor: worst {min(ratios):.2f}, median {statistics.median(ratios):.2f} "
        f"(target >= {TARGET_RATIO} in every round); payhook p99: worst {worst_p99:.2f} ms "
        f"(target <= {TARGET_P99_MS}); largest slowdown from one round to the next: payhook "
        f"{payhook_slower:.0%}, floor {floor_slower:.0%} (target: payhook's no larger)"
    )
    return (
        min(ratios) >= TARGET_RATIO
        and worst_p99 <= TARGET_P99_MS
        and payhook_slower <= max(0.0, floor_slower)
    )


def main(floor_loop: str, rounds: int, rotations: Sequence[int]) -> int:
    if not Path(WRK).exists():
        print("bench: wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="payhook-bench-"))
    results: dict[int, list[tuple[Load, Load]]] = {}
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
        floor, floor_port = start_floor(floor_loop)
        try:
            wait_ready(f"http://127.0.0.1:{http_port}/readyz")
            wait_for_port(floor_port, timeout=20)
            for webhooks in rotations:
                script = work / f"webhooks-{webhooks}.lua"
                script.write_text(lua_script(webhooks))
                # Alternating rounds: a noisy neighbour slows one round of both, not one side.
                for _ in range(rounds):
                    payhook = measure(http_port, script, serve.pid)
                    floor_load = measure(floor_port, script, floor.pid)
                    results.setdefault(webhooks, []).append((payhook, floor_load))
        finally:
            stop_process(floor, grace=30)
            stop_process(serve, grace=30)
        answered, accepted = accepted_in(work / "serve.log")
        records, on_topic, misplaced = asyncio.run(
            read_event_ids(broker.bootstrap, settings.events_topic, answered)
        )
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"ingest benchmark: {CONNECTIONS} connections, {RUN_SECONDS}s after "
        f"{WARMUP_SECONDS}s warm-up, wrk -t1; floor on {floor_loop}'s event loop; "
        f"{rounds} rounds, payhook then floor in each"
    )
    met = all([report(webhooks, loads) for webhooks, loads in results.items()])
    missing = accepted - on_topic
    print(
        f"answered 200 by payhook (warm-up included): {answered} ({len(accepted)} distinct "
        f"events); records on the topic: {records} ({len(on_topic)} distinct); "
        f"missing: {len(missing)}; on another partition than their key's: {misplaced}"
    )
    ok = (
        all(p.non_200 == 0 and p.socket_errors == 0 for loads in results.values() for p, _ in loads)
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
