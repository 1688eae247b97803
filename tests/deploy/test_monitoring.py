"""Live monitoring checks: real `payhook serve` and `payhook consume` processes on the session
broker, their /metrics, and a real Prometheus server scraping them.

The processes get webhooks that exercise what the alerts and the dashboard look at: accepted
ones, a duplicate, a refused one, one whose amountDiff disagrees with ours (a discrepancy), and
an undecodable record on the events topic (the DLQ).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaProducer

from devtools.devbroker import LocalBroker, free_port
from service.ingest.secrets import mint_secret
from service.settings import Settings, load_settings
from tests.fixtures_app import bitfinex, encode
from tests.fixtures_kafka import TEST_ENV
from tests.fixtures_monitoring import (
    PrometheusServer,
    dashboard_queries,
    http_get,
    parse_exposition,
    queried_metrics,
)

PAYHOOK = Path(sys.executable).parent / "payhook"
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], within: float, what: str) -> T:
    """Polls ``check`` until it returns something other than None/False; fails after ``within``."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.1)  # the poll interval of a condition, not a stand-in for one


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    def alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(
                f"payhook {self.name} exited with {self.popen.returncode}:\n{self.log.read_text()}"
            )

    def get(self, path: str) -> tuple[int, bytes]:
        self.alive()
        return http_get(self.port, path)

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, body = self.get("/metrics")
        assert status == 200
        return parse_exposition(body.decode())

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise
        return self.popen.returncode


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(v for lbls, v in samples.get(name, []) if labels.items() <= lbls.items())


@dataclass
class Stack:
    settings: Settings
    serve: Process
    consume: Process
    orders: Iterator[int]
    recover: Process | None = None

    def post_bitfinex(self, body: dict[str, Any], token: str | None = None) -> int:
        order = body["orderId"]
        token = token or mint_secret(self.settings.signing_keys, "bitfinex", order)
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.serve.port, timeout=10)
        try:
            connection.request(
                "POST",
                f"/v1/webhooks/bitfinex/{order}?token={token}",
                body=encode(body),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def new_webhook(self, **payment: Any) -> dict[str, Any]:
        n = next(self.orders)
        body = bitfinex(orderId=f"mon-order-{n}", id=f"mon-invoice-{n}")
        body["payment"] = {**body["payment"], "txid": f"tx-{n}", **payment}
        return body


def _start(name: str, env: dict[str, str], port: int, workdir: Path) -> Process:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [str(PAYHOOK), name], env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
        )
    return Process(name=name, popen=popen, log=log, port=port)


async def _produce_raw(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"bitfinex:garbage")
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def stack(kafka_broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`payhook serve` and `payhook consume` as real processes, with traffic already through."""
    workdir = tmp_path_factory.mktemp("monitoring")
    serve_port, consume_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYHOOK_")},
        **TEST_ENV,
        "PAYHOOK_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "PAYHOOK_TOPIC_PREFIX": f"mon{uuid.uuid4().hex[:8]}",
        "PAYHOOK_HTTP_HOST": "127.0.0.1",
        "PAYHOOK_HTTP_PORT": str(serve_port),
        "PAYHOOK_CONSUMER_PORT": str(consume_port),
        "PAYHOOK_PUBLIC_URL": f"http://127.0.0.1:{serve_port}",
        "PAYHOOK_STORE_URL": f"sqlite:///{workdir / 'payhook.db'}",
        "PAYHOOK_SPOOL_DIR": str(workdir / "spool"),
        "PAYHOOK_CONSUMER_GROUP": f"mon-{uuid.uuid4().hex[:8]}",
        "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "PAYHOOK_KAFKA_IDEMPOTENCE": "false",  # Tansu has no idempotent producers
        "PAYHOOK_SHUTDOWN_TIMEOUT": "10",
        # Recovery of CryptoSteroid: the store holds no open CryptoSteroid invoice, so a sweep
        # asks its API nothing (nothing listens there) and succeeds.
        "PAYHOOK_RECOVER_PORT": str(free_port()),
        "PAYHOOK_RECOVER_INTERVAL": "1",
        "PAYHOOK_CRYPTOSTEROID_API_URL": f"http://127.0.0.1:{free_port()}",
        "PAYHOOK_CRYPTOSTEROID_API_KEY": "monitoring-key",
        "PAYHOOK_CRYPTOSTEROID_MERCHANT_ID": "monitoring-merchant",
    }
    settings = load_settings(env)
    serve = _start("serve", env, serve_port, workdir)
    consume = _start("consume", env, consume_port, workdir)
    stack = Stack(settings=settings, serve=serve, consume=consume, orders=itertools.count(1))
    try:
        wait_until(serve.ready, 60, "payhook serve /readyz")
        wait_until(consume.ready, 60, "payhook consume /readyz")
        # recover reads the store the consumer created
        stack.recover = _start("recover", env, int(env["PAYHOOK_RECOVER_PORT"]), workdir)
        wait_until(stack.recover.ready, 60, "payhook recover /readyz")

        first = stack.new_webhook()
        assert stack.post_bitfinex(first) == 200
        assert stack.post_bitfinex(first) == 200, "a repeat is accepted again"
        assert stack.post_bitfinex(stack.new_webhook()) == 200
        # the payment matches the invoice exactly, yet the provider says 0.5 is missing
        assert stack.post_bitfinex(stack.new_webhook(amountDiff="0.5")) == 200
        assert stack.post_bitfinex(stack.new_webhook(), token="k2.forged") == 401
        asyncio.run(
            _produce_raw(kafka_broker.bootstrap, settings.events_topic, b"\xffnot an event")
        )

        def consumed() -> bool:
            s = consume.samples()
            return (
                value(s, "payhook_consumer_events_total", outcome="processed") >= 3
                and value(s, "payhook_consumer_events_total", outcome="duplicate") >= 1
                and value(s, "payhook_consumer_events_total", outcome="dlq") >= 1
                and value(s, "payhook_discrepancies_total", provider="bitfinex") >= 1
            )

        wait_until(consumed, 90, "the consumer to process, dedupe, dead-letter and settle")
        yield stack
    finally:
        codes = {p.name: p.stop() for p in (serve, consume, stack.recover) if p is not None}
    assert codes == {"serve": 0, "consume": 0, "recover": 0}, "all exit 0 on SIGTERM"


def test_every_queried_metric_is_in_a_real_scrape(stack: Stack) -> None:
    assert stack.recover is not None
    exposed = {**stack.serve.samples(), **stack.consume.samples(), **stack.recover.samples()}
    used = queried_metrics()
    missing = {name: sorted(who) for name, who in used.items() if not exposed.get(name)}
    assert missing == {}, "queried by deploy/ but not exposed by a running payhook"
    # the label values the alerts select on are the ones payhook writes
    serve, consume = stack.serve.samples(), stack.consume.samples()
    assert value(serve, "payhook_webhooks_total", provider="bitfinex", outcome="accepted") >= 4
    assert value(serve, "payhook_webhooks_total", provider="bitfinex", outcome="unauthorized") >= 1
    assert value(serve, "payhook_http_request_duration_seconds_count", outcome="accepted") >= 4
    assert value(serve, "payhook_publish_duration_seconds_count", outcome="kafka") >= 1
    assert value(serve, "payhook_ready") == 1
    assert value(consume, "payhook_ready") == 1
    assert {lbls["component"] for lbls, _ in serve["payhook_build_info"]} == {"serve"}
    assert {lbls["component"] for lbls, _ in consume["payhook_build_info"]} == {"consume"}
    assert {lbls["topic"] for lbls, _ in consume["payhook_consumer_lag"]} == {
        stack.settings.events_topic
    }
    assert value(consume, "payhook_settlements_total", state="paid") >= 1
    recover = stack.recover.samples()
    assert value(recover, "payhook_ready") == 1
    assert {lbls["component"] for lbls, _ in recover["payhook_build_info"]} == {"recover"}
    ok = {"provider": "cryptosteroid", "outcome": "ok"}
    assert value(recover, "payhook_recover_sweeps_total", **ok) >= 1
    assert value(recover, "payhook_recover_configured", provider="bitfinex") == 0


def _number(result: list[dict[str, Any]]) -> float | None:
    if len(result) != 1:
        return None
    number = float(result[0]["value"][1])
    return None if math.isnan(number) else number


def test_prometheus_scrapes_payhook_and_computes_latency_quantiles(
    stack: Stack, prometheus_server: PrometheusServer
) -> None:
    prom = prometheus_server
    prom.scrape("payhook-serve", f"127.0.0.1:{stack.serve.port}")
    prom.scrape("payhook-consume", f"127.0.0.1:{stack.consume.port}")

    def both_up() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
        return up == {"payhook-serve": "1", "payhook-consume": "1"}

    wait_until(both_up, 30, "Prometheus to scrape serve and consume")

    p99 = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(payhook_http_request_duration_seconds_bucket{outcome="accepted"}[1m])))'
    )

    def quantile() -> float | None:
        # a rate needs requests between two scrapes: keep a few arriving while we look
        assert stack.post_bitfinex(stack.new_webhook()) == 200
        return _number(prom.query(p99))

    latency = wait_until(quantile, 30, "histogram_quantile over the HTTP latency")
    assert 0 < latency <= 10, "within the histogram's buckets"

    # the per-provider quantile the dashboard draws works too
    by_provider = prom.query(
        "histogram_quantile(0.5, sum by (le, provider) "
        '(rate(payhook_http_request_duration_seconds_bucket{outcome="accepted"}[1m])))'
    )
    assert [r["metric"]["provider"] for r in by_provider] == ["bitfinex"]


def test_alert_rules_and_dashboard_queries_run_in_real_prometheus(
    stack: Stack, prometheus_server: PrometheusServer
) -> None:
    prom = prometheus_server
    prom.scrape("payhook-serve", f"127.0.0.1:{stack.serve.port}")
    prom.scrape("payhook-consume", f"127.0.0.1:{stack.consume.port}")
    assert stack.recover is not None
    prom.scrape("payhook-recover", f"127.0.0.1:{stack.recover.port}")

    def all_rules_evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in prom.get("/api/v1/rules")["groups"] for rule in group["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001-") for r in rules)
        return rules if rules and done else None

    rules = wait_until(all_rules_evaluated, 30, "every rule to be evaluated once")
    assert {(r["name"], r["health"], r.get("lastError", "")) for r in rules} == {
        (r["name"], "ok", "") for r in rules
    }

    # a scrape of the consumer's discrepancy counter, seen through PromQL
    def discrepancies() -> float | None:
        return _number(prom.query('sum(payhook_discrepancies_total{provider="bitfinex"})'))

    assert wait_until(discrepancies, 30, "the discrepancy counter in Prometheus") >= 1

    # every panel's PromQL parses and runs (Grafana's variables replaced as Grafana would)
    for title, expr in dashboard_queries():
        promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
        prom.query(promql)  # asserts status success
        assert title
