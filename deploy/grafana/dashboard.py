"""The payhook Grafana dashboard, as code (grafana-foundation-sdk).

    .venv/bin/python deploy/grafana/dashboard.py        # rewrites dashboards/payhook.json

The JSON beside it is generated, checked in and provisioned by Grafana; tests/test_deploy.py
fails when it is stale, and tests/test_monitoring.py checks that every metric queried here is
exposed by a running payhook. Metric names come from service/metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = Path(__file__).parent / "dashboards" / "payhook.json"
UID = "payhook"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"


def query(expr: str, legend: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend)


def quantile(q: float, metric: str, by: str = "", matchers: str = "") -> str:
    labels = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{matchers}{RATE})))"


def timeseries(title: str, unit: str, description: str, *queries: Dataquery) -> Timeseries:
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(8)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
        )
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI))
    )
    for ref_id, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(q.ref_id(ref_id))
    return panel


def stat(title: str, unit: str, description: str, q: Dataquery) -> Stat:
    return (
        Stat()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(6)
        .graph_mode(BigValueGraphMode.AREA)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(q.ref_id("A"))
    )


def ingest_panels() -> list[Timeseries | Stat]:
    return [
        stat(
            "Accepted webhooks (share)",
            "percentunit",
            "Share of webhook requests answered 200 over the range.",
            query(
                'sum(rate(payhook_webhooks_total{outcome="accepted"}[$__range]))'
                " / sum(rate(payhook_webhooks_total[$__range]))",
                "accepted",
            ),
        ),
        stat(
            "503 unavailable",
            "short",
            "Webhooks refused because neither Kafka nor the spool could take them.",
            query('sum(increase(payhook_webhooks_total{outcome="unavailable"}[$__range]))', "503"),
        ),
        stat(
            "Spool depth",
            "short",
            "Events waiting in the local spools for Kafka (all instances).",
            query("sum(payhook_spool_depth)", "events"),
        ),
        stat(
            "Ready instances",
            "short",
            "Instances whose /readyz answers 200 (serve and consume).",
            query("sum(payhook_ready)", "ready"),
        ),
        timeseries(
            "Webhooks by provider and outcome",
            "reqps",
            "Requests per second; outcome is accepted or the error code answered.",
            query(
                f"sum by (provider, outcome) (rate(payhook_webhooks_total{RATE}))",
                "{{provider}} {{outcome}}",
            ),
        ),
        timeseries(
            "Webhook latency (accepted)",
            "s",
            "From request to 200, which waits for Kafka's acks=all or the spool's fsync.",
            query(
                quantile(
                    0.5, "payhook_http_request_duration_seconds", "provider", '{outcome="accepted"}'
                ),
                "p50 {{provider}}",
            ),
            query(
                quantile(
                    0.99,
                    "payhook_http_request_duration_seconds",
                    "provider",
                    '{outcome="accepted"}',
                ),
                "p99 {{provider}}",
            ),
        ),
        timeseries(
            "Publish latency by destination",
            "s",
            "Time to make one event durable: in Kafka, in the spool, or failed.",
            query(quantile(0.99, "payhook_publish_duration_seconds", "outcome"), "p99 {{outcome}}"),
        ),
        timeseries(
            "Spool depth",
            "short",
            "Events per instance waiting for Kafka; should be 0 outside a Kafka outage.",
            query("payhook_spool_depth", "{{instance}}"),
        ),
        timeseries(
            "Spool oldest event age",
            "s",
            "How long the oldest spooled event has waited; grows during a Kafka outage.",
            query("payhook_spool_oldest_age_seconds", "{{instance}}"),
        ),
        timeseries(
            "Spool size",
            "bytes",
            "Bytes used by each spool; 503 starts when it reaches PAYHOOK_SPOOL_MAX_BYTES.",
            query("payhook_spool_bytes", "{{instance}}"),
        ),
        timeseries(
            "Spool drained",
            "ops",
            "Spooled events republished to Kafka per second.",
            query(
                f"sum by (instance) (rate(payhook_spool_drained_events_total{RATE}))",
                "{{instance}}",
            ),
        ),
        timeseries(
            "Readiness by instance",
            "short",
            "1 while /readyz answers 200; 0 while shutting down or unable to accept.",
            query("payhook_ready", "{{job}} {{instance}}"),
        ),
    ]


def consumer_panels() -> list[Timeseries | Stat]:
    return [
        stat(
            "Dead-lettered events",
            "short",
            "Events sent to the DLQ topic over the range.",
            query('sum(increase(payhook_consumer_events_total{outcome="dlq"}[$__range]))', "dlq"),
        ),
        stat(
            "Discrepancies",
            "short",
            "Settlements whose difference disagrees with the provider's amountDiff.",
            query("sum(increase(payhook_discrepancies_total[$__range]))", "discrepancies"),
        ),
        stat(
            "Consumer lag",
            "short",
            "Records not yet consumed, all partitions (approximate on the local Tansu broker).",
            query("sum(max by (topic, partition) (payhook_consumer_lag))", "lag"),
        ),
        stat(
            "Consumer restarts",
            "short",
            "Kafka consumers recreated after they stopped making progress.",
            query("sum(increase(payhook_consumer_restarts_total[$__range]))", "restarts"),
        ),
        timeseries(
            "Consumed events by outcome",
            "ops",
            "processed, duplicate (an event_id seen before) or dlq.",
            query(f"sum by (outcome) (rate(payhook_consumer_events_total{RATE}))", "{{outcome}}"),
        ),
        timeseries(
            "Settlements by state",
            "ops",
            "Settlement versions published per second, by state.",
            query(f"sum by (state) (rate(payhook_settlements_total{RATE}))", "{{state}}"),
        ),
        timeseries(
            "Discrepancies by provider",
            "short",
            "Settlements flagged discrepancy=true per interval.",
            query(
                f"sum by (provider) (increase(payhook_discrepancies_total{RATE}))",
                "{{provider}}",
            ),
        ),
        timeseries(
            "Webhook to settlement",
            "s",
            "From received_at at ingest to the settlement being published.",
            query(quantile(0.5, "payhook_settlement_latency_seconds"), "p50"),
            query(quantile(0.99, "payhook_settlement_latency_seconds"), "p99"),
        ),
        timeseries(
            "Batch duration",
            "s",
            "Time to handle one consumed batch, store transaction and publish included.",
            query(quantile(0.99, "payhook_consumer_batch_duration_seconds"), "p99"),
        ),
        timeseries(
            "Consumer lag by partition",
            "short",
            "Records behind the end of each partition.",
            query("max by (topic, partition) (payhook_consumer_lag)", "{{topic}} [{{partition}}]"),
        ),
        timeseries(
            "Instances by version",
            "short",
            "Running processes by component (serve, consume) and payhook version.",
            query(
                "count by (component, version) (payhook_build_info)", "{{component}} {{version}}"
            ),
        ),
    ]


def recover_panels() -> list[Timeseries | Stat]:
    return [
        stat(
            "Missed notifications recovered",
            "short",
            "Events read back from the providers' APIs and published over the range: each one "
            "a notification that never reached payhook.",
            query("sum(increase(payhook_recover_events_published_total[$__range]))", "recovered"),
        ),
        stat(
            "Oldest last successful sweep",
            "s",
            "Seconds since the least recently successful provider's last good sweep "
            "(PayhookRecoveryStale past 30 minutes).",
            query("max(time() - payhook_recover_last_success_timestamp_seconds)", "age"),
        ),
        stat(
            "Recovery errors",
            "short",
            "Windows or invoices not read whole, refused credentials and failed publishes over "
            "the range.",
            query("sum(increase(payhook_recover_errors_total[$__range]))", "errors"),
        ),
        stat(
            "Providers swept",
            "short",
            "Providers whose API settings are set (a provider without them is not swept).",
            query("sum(payhook_recover_configured)", "providers"),
        ),
        timeseries(
            "Recovery sweeps by provider and outcome",
            "short",
            "Sweeps per interval: ok, or error (a window or invoice not read whole, refused "
            "credentials, a failed publish).",
            query(
                f"sum by (provider, outcome) (increase(payhook_recover_sweeps_total{RATE}))",
                "{{provider}} {{outcome}}",
            ),
        ),
        timeseries(
            "Recovered events by provider",
            "short",
            "Missed notifications recovered per interval, by provider and status.",
            query(
                "sum by (provider, status) "
                f"(increase(payhook_recover_events_published_total{RATE}))",
                "{{provider}} {{status}}",
            ),
        ),
        timeseries(
            "Provider API requests by outcome",
            "reqps",
            "Requests to the providers' APIs: ok, retry, rate_limited, unavailable, refused.",
            query(
                f"sum by (provider, outcome) (rate(payhook_recover_api_requests_total{RATE}))",
                "{{provider}} {{outcome}}",
            ),
        ),
    ]


def build() -> Dashboard:
    dashboard = (
        Dashboard("payhook")
        .uid(UID)
        .description("Webhook ingest, spool, reconciling consumer and recovery.")
        .tags(["payhook", "generated"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("utc")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_row(Row("Ingest (payhook serve)").id(1))
    )
    panel_id = 1
    for panel in ingest_panels():
        panel_id += 1
        dashboard = dashboard.with_panel(panel.id(panel_id))
    dashboard = dashboard.with_row(Row("Consumer (payhook consume)").id(panel_id + 1))
    panel_id += 1
    for panel in consumer_panels():
        panel_id += 1
        dashboard = dashboard.with_panel(panel.id(panel_id))
    dashboard = dashboard.with_row(Row("Recovery (payhook recover)").id(panel_id + 1))
    panel_id += 1
    for panel in recover_panels():
        panel_id += 1
        dashboard = dashboard.with_panel(panel.id(panel_id))
    return dashboard


def render() -> str:
    """The dashboard as the JSON text checked in beside this file."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
