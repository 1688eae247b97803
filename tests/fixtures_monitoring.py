"""What deploy/ queries, and a real Prometheus server to run those queries.

`queried_metrics()` reads the alert rules and the generated Grafana dashboard and returns every
``payhook_*`` metric they use. `prometheus_server` starts Debian's /usr/bin/prometheus on a free
loopback port with a temporary storage directory, scraping the targets a test registers.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.devbroker import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "payhook.json"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")

# Recording rules are named payhook:...:..., so they never match this.
_METRIC = re.compile(r"\bpayhook_[a-z0-9_]+\b")


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the generated dashboard."""
    doc = json.loads(DASHBOARD_JSON.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in doc["panels"]
        for target in panel.get("targets", [])
    ]


def queried_metrics() -> dict[str, set[str]]:
    """Every payhook_* series name an alert, a recording rule or a panel queries -> who uses it."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        who = rule.get("alert") or rule["record"]
        for name in _METRIC.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {who}")
    for title, expr in dashboard_queries():
        for name in _METRIC.findall(expr):
            used.setdefault(name, set()).add(f"panel {title!r}")
    return used


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:{port}{path} -> (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a Prometheus text exposition, by series name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


@dataclass
class PrometheusServer:
    """A running Prometheus; `targets` is the file_sd file a test writes its targets into."""

    port: int
    targets: Path
    process: subprocess.Popen[bytes]
    log: Path
    scrape_jobs: dict[str, list[str]] = field(default_factory=dict)

    def scrape(self, job: str, *addresses: str) -> None:
        """Adds scrape targets under `job`; Prometheus re-reads the file on its own."""
        self.scrape_jobs.setdefault(job, []).extend(addresses)
        groups = [
            {"targets": targets, "labels": {"job": name}}
            for name, targets in self.scrape_jobs.items()
        ]
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets)  # atomic: Prometheus never reads half a file

    def query(self, promql: str) -> list[dict[str, Any]]:
        status, raw = http_get(
            self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        body = json.loads(raw)
        assert status == 200, body
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def get(self, path: str) -> Any:
        status, raw = http_get(self.port, path)
        assert status == 200, raw
        return json.loads(raw)["data"]


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http_get(port, "/-/ready", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling a readiness endpoint, not standing in for synchronization
    raise TimeoutError(f"prometheus not ready after {timeout}s:\n{log.read_text()}")


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[PrometheusServer]:
    """Debian's Prometheus on a free loopback port, scraping every 1 s, temporary storage."""
    assert PROMETHEUS.exists(), "run `make promtool` (Debian's prometheus package)"
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    targets = workdir / "targets.json"
    targets.write_text("[]")
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "900ms",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "payhook",
                        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(port, process, log, timeout=30)
        yield PrometheusServer(port=port, targets=targets, process=process, log=log)
    finally:
        stop_process(process, grace=10)
