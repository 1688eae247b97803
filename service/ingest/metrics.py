"""Metrics of ``payhook serve`` (see :mod:`service.metrics` for the shared parts)."""

from __future__ import annotations

from typing import final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

from service.metrics import LATENCY_BUCKETS, LoopHistogram, build_info
from service.readiness import Readiness


@final
class IngestMetrics:
    """Metrics of ``payhook serve``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        build_info(r, "serve")
        # One observation per webhook request feeds both the latency histogram and
        # payhook_webhooks_total.
        self.webhooks = LoopHistogram(
            "payhook_http_request_duration_seconds",
            "Webhook request latency, by provider and outcome (the error code, or accepted)",
            ["provider", "outcome"],
            LATENCY_BUCKETS,
            r,
            counter=(
                "payhook_webhooks",
                "Webhook requests by provider and outcome (the error code, or accepted)",
            ),
        )
        self.publish_latency = LoopHistogram(
            "payhook_publish_duration_seconds",
            "Time to make one event durable, by where it went (kafka, spool) or failed",
            ["outcome"],
            LATENCY_BUCKETS,
            r,
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
        # Set once at start: what a previous process left in this spool (it stopped with events
        # Kafka had not taken). They survive that process's series, so an alert can see them.
        self.spool_recovered = Gauge(
            "payhook_spool_recovered_events",
            "Events found in the spool at start, left by a previous process (drained first)",
            registry=r,
        )
        self.spool_recovered_at = Gauge(
            "payhook_spool_recovered_timestamp_seconds",
            "When this process found events left in its spool (unix time; 0: none found)",
            registry=r,
        )
        self.readiness = Readiness(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
