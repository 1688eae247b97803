"""Prometheus metrics, all ``payhook_*``.

Each process builds its own registry (no module globals), so tests can run several apps side by
side. Labels are bounded: provider, outcome, state, topic, partition; never an order or
invoice id.
"""

from __future__ import annotations

from typing import Final, final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from service import __version__

# Sub-millisecond to 10 s.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# End-to-end (received -> settled) spans the spool and consumer lag: up to minutes.
E2E_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


def _build_info(registry: CollectorRegistry, component: str) -> None:
    info = Info("payhook_build", "payhook build information", registry=registry)
    info.info({"version": __version__, "component": component})


@final
class IngestMetrics:
    """Metrics of ``payhook serve``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        _build_info(r, "serve")
        self.http_latency = Histogram(
            "payhook_http_request_duration_seconds",
            "Webhook request latency, by provider and outcome (the error code, or accepted)",
            ["provider", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.webhooks = Counter(
            "payhook_webhooks",
            "Webhook requests by provider and outcome (the error code, or accepted)",
            ["provider", "outcome"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "payhook_publish_duration_seconds",
            "Time to make one event durable, by where it went (kafka, spool) or failed",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spool_depth = Gauge(
            "payhook_spool_depth", "Events in the local spool awaiting Kafka", registry=r
        )
        self.spool_bytes = Gauge("payhook_spool_bytes", "Bytes used by the local spool", registry=r)
        self.spool_oldest_age = Gauge(
            "payhook_spool_oldest_age_seconds",
            "Age of the oldest spooled event (0 when the spool is empty)",
            registry=r,
        )
        self.spool_drained = Counter(
            "payhook_spool_drained_events", "Spooled events republished to Kafka", registry=r
        )
        self.ready = Gauge("payhook_ready", "1 when /readyz answers 200", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@final
class ConsumerMetrics:
    """Metrics of ``payhook consume``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        _build_info(r, "consume")
        self.events = Counter(
            "payhook_consumer_events",
            "Consumed invoice events by outcome (processed, duplicate, dlq)",
            ["outcome"],
            registry=r,
        )
        self.settlements = Counter(
            "payhook_settlements",
            "Settlement versions published, by state",
            ["state"],
            registry=r,
        )
        self.discrepancies = Counter(
            "payhook_discrepancies",
            "Settlements published whose difference disagrees with the provider's amountDiff",
            ["provider"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "payhook_settlement_latency_seconds",
            "From received_at (ingest) to the settlement being published",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "payhook_consumer_batch_duration_seconds",
            "Time to handle one consumed batch, store and publish included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "payhook_consumer_lag",
            "Records behind the partition's high watermark (approximate on Tansu)",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_restarts = Counter(
            "payhook_consumer_restarts",
            "Kafka consumers recreated after they stopped making progress",
            registry=r,
        )
        self.ready = Gauge("payhook_ready", "1 when /readyz answers 200", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
