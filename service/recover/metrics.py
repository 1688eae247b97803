"""Metrics of ``payhook recover``. Labels: provider, outcome, status; never an invoice id."""

from __future__ import annotations

from typing import Final, final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from service.metrics import build_info
from service.readiness import Readiness

# A sweep lasts from milliseconds (nothing to read) to minutes (paced Bitfinex listings).
SWEEP_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@final
class RecoverMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        build_info(r, "recover")
        self.sweeps = Counter(
            "payhook_recover_sweeps",
            "Recovery sweeps by provider and outcome (ok, error)",
            ["provider", "outcome"],
            registry=r,
        )
        self.published = Counter(
            "payhook_recover_events_published",
            "Events read back from a provider's API and published: notifications payhook missed",
            ["provider", "status"],
            registry=r,
        )
        self.last_success = Gauge(
            "payhook_recover_last_success_timestamp_seconds",
            "When the provider's last successful sweep ended (process start until the first)",
            ["provider"],
            registry=r,
        )
        self.errors = Counter(
            "payhook_recover_errors",
            "Windows or invoices a sweep could not read whole, refused credentials, failed "
            "publishes",
            ["provider"],
            registry=r,
        )
        self.requests = Counter(
            "payhook_recover_api_requests",
            "Requests to the providers' APIs by outcome (ok, retry, rate_limited, unavailable, "
            "refused, not_found, undecodable)",
            ["provider", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "payhook_recover_sweep_duration_seconds",
            "Time one provider's sweep took",
            ["provider"],
            buckets=SWEEP_BUCKETS,
            registry=r,
        )
        self.configured = Gauge(
            "payhook_recover_configured",
            "1 when the provider's API settings are set and it is swept",
            ["provider"],
            registry=r,
        )
        self.readiness = Readiness(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
