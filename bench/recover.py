"""``python -m bench.recover``: one ``payhook recover --once`` sweep over 1,000 Bitfinex invoices.

The Bitfinex API is the test simulator (tests/recover/simulators.py) on loopback, on the real
clock (the pacer really waits), answering in an undocumented (shuffled) order; the store is a
fresh SQLite store, so every listed invoice that completed, expired or was paid is published
with ``acks=all`` to the local Tansu broker, where the real consumer settles it into the store.
Once every event is processed, a second sweep finds nothing new. Reports the
time and the number of listing requests of each sweep, and what the requests would cost at a
real API's round trip (``--rtt``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from devtools.devbroker import LocalBroker
from service.consume.supervisor import Consumer
from service.logs import configure_logging
from service.recover.process import Options, once
from service.settings import Secret, Settings, load_settings
from tests.fixtures_consume import consumer_settings, counter, running_consumer, wait_for
from tests.recover.simulators import BitfinexSimulator, bitfinex_invoice

HOUR_MS = 3_600_000
SECRET = "bench-secret"


def _settled(consumer: Consumer, published: int) -> bool:
    return counter(consumer, "payhook_consumer_events_total", outcome="processed") >= published


async def _sweep(settings: Settings) -> tuple[int, float, str]:
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = await once(settings, Options())
    return code, time.perf_counter() - started, out.getvalue().splitlines()[0]


async def main(count: int, rtt: float) -> int:
    configure_logging("json", logging.ERROR)
    simulator = BitfinexSimulator(api_key="bench", api_secret=SECRET, now=time.monotonic)
    now = int(time.time() * 1000)
    span = 47 * HOUR_MS
    for i in range(count):
        status = "EXPIRED" if i % 5 == 0 else "CREATED" if i % 7 == 0 else "COMPLETED"
        simulator.invoices.append(bitfinex_invoice(i, now - span + i * span // count, status))
    runner = web.AppRunner(simulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    with tempfile.TemporaryDirectory() as tmp, LocalBroker(log_path=Path(tmp) / "t.log") as kafka:
        base = load_settings({"PAYHOOK_LOG_FORMAT": "json"}, require_signing_keys=False)
        settings = dataclasses.replace(
            consumer_settings(dataclasses.replace(base, topic_prefix="bench")),
            kafka_bootstrap=kafka.bootstrap,
            store_url=f"sqlite:///{tmp}/payhook.db",
            bitfinex_api_url=f"http://{host}:{port}",
            bitfinex_api_key=Secret(b"bench"),
            bitfinex_api_secret=Secret(SECRET.encode()),
        )
        async with running_consumer(settings) as consumer:
            await wait_for(lambda: consumer.ready, within=60, what="the consumer")
            published = 0
            for label in ("first sweep", "second sweep"):
                before = len(simulator.request_times)
                code, seconds, line = await _sweep(settings)
                requests = len(simulator.request_times) - before
                print(
                    f"{label}: exit {code}, {seconds:.2f} s, {requests} listing requests "
                    f"(at {rtt * 1000:.0f} ms a round trip: {requests * rtt:.1f} s)\n  {line}"
                )
                published += int(line.split(" published=")[1].split()[0])
                await wait_for(
                    functools.partial(_settled, consumer, published),
                    within=120,
                    what="the consumer to settle every recovered event",
                )
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--invoices", type=int, default=1000)
    parser.add_argument("--rtt", type=float, default=0.3, help="a real API round trip, seconds")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.invoices, args.rtt)))
