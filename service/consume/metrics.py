"""Metrics of ``payhook consume`` (see :mod:`service.metrics` for the shared parts)."""

from __future__ import annotations

from typing import final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from service.metrics import E2E_BUCKETS, LATENCY_BUCKETS, build_info
from service.readiness import Readiness


@final
class ConsumerMetrics:
    """Metrics of ``payhook consume``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        build_info(r, "consume")
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
        self.order_conflicts = Counter(
            "payhook_order_conflicts",
            "Events refused (to the DLQ) because their invoice belongs to another order",
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
        self.readiness = Readiness(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
