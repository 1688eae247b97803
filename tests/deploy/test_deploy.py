"""Static checks of deploy/: rules, compose, Dockerfile, Kubernetes manifests, dashboard.

No Docker engine or cluster runs here, so these validate with the real tools that work offline:
promtool, the Compose JSON Schema shipped by docker-compose 1.29.2 (PyPI), BuildKit's own
Dockerfile parser and hadolint (PyPI wheels), kubernetes-validate's bundled API schemas, and the
ServiceMonitor schema from cloudcoil-models-prometheus-operator (generated from the
prometheus-operator v0.80.1 CRD), with unknown fields rejected as `kubectl --validate=strict` does.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import jsonschema
import kubernetes_validate
import pytest
import yaml

from devtools.devbroker import free_port
from service.consume.metrics import ConsumerMetrics
from service.ingest.metrics import IngestMetrics
from service.ingest.server import READINESS_GRACE
from service.recover.metrics import RecoverMetrics
from service.settings import load_settings
from tests.fixtures_monitoring import (
    ALERT_TESTS,
    ALERTS,
    DASHBOARD_JSON,
    DEPLOY,
    PROMTOOL,
    REPO,
    alert_rules,
    queried_metrics,
)

COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
README = REPO / "README.md"

# The Compose JSON Schema as shipped in the docker-compose 1.29.2 wheel on PyPI.
COMPOSE_PACKAGE = "docker-compose==1.29.2"
COMPOSE_SCHEMA_MEMBER = "compose/config/compose_spec.json"
COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
# Oldest Kubernetes these manifests claim (preStop `sleep` is on by default from 1.30), and the
# newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ---- Prometheus rules --------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run(str(PROMTOOL), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run(str(PROMTOOL), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    required = {
        "PayhookNothingAccepted",
        "PayhookUnavailable",
        "PayhookSpoolNotEmpty",
        "PayhookConsumerLagGrowing",
        "PayhookDeadLetters",
        "PayhookDiscrepancy",
        "PayhookHighLatency",
    }
    assert required <= alerts
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts without a test where they fire"
    assert alerts - silent == set(), "alerts without a test where they stay silent"
    assert (fires | silent) - alerts == set(), "tests for alerts that do not exist"


def test_every_alert_has_severity_and_a_runbook_entry() -> None:
    readme = README.read_text()
    headings = {
        m.group(1).strip().lower() for m in re.finditer(r"^#{2,5} (.+)$", readme, re.MULTILINE)
    }
    for rule in alert_rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["runbook"] == f"README.md#{name.lower()}", name
        assert name.lower() in headings, f"README.md has no section for {name}"


def test_compose_prometheus_config_is_valid() -> None:
    result = run(str(PROMTOOL), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def _exposable_series(*registries: Any) -> set[str]:
    """Series names the metrics classes can expose (labelled children appear once used)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def test_every_queried_metric_is_defined_in_service_metrics() -> None:
    defined = _exposable_series(
        IngestMetrics().registry, ConsumerMetrics().registry, RecoverMetrics().registry
    )
    used = queried_metrics()
    assert used, "found no payhook_* metric in the rules or the dashboard"
    missing = {name: sorted(who) for name, who in used.items() if name not in defined}
    assert missing == {}


def test_operations_readme_documents_every_metric() -> None:
    readme = README.read_text()
    families = {
        family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        for registry in (
            IngestMetrics().registry,
            ConsumerMetrics().registry,
            RecoverMetrics().registry,
        )
        for family in registry.collect()
    }
    assert {name for name in families if f"`{name}`" not in readme} == set()


# ---- Compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The schema from the docker-compose wheel, fetched from PyPI once into var/ and pinned.

    docker-compose itself is never installed: its dependencies conflict with ours.
    """
    cached = REPO / "var" / "compose-1.29.2" / "compose_spec.json"
    if not cached.exists():
        wheels = tmp_path_factory.mktemp("compose-wheel")
        result = run(
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--dest", str(wheels), COMPOSE_PACKAGE,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (wheel,) = wheels.glob("docker_compose-1.29.2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(COMPOSE_SCHEMA_MEMBER)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    data = cached.read_bytes()
    assert hashlib.sha256(data).hexdigest() == COMPOSE_SCHEMA_SHA256
    schema: dict[str, Any] = json.loads(data)
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _compose_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft201909Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_compose_file_matches_the_compose_schema(
    compose_schema: dict[str, Any], compose: dict[str, Any]
) -> None:
    assert _compose_errors(compose_schema, compose) == []


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d["services"]["serve"].update(enviroment={}), "misspelt service key"),
        (lambda d: d["services"]["serve"].update(ports=[{"target": "http"}]), "port not a number"),
        (
            lambda d: d["services"]["serve"].update(
                depends_on={"topics": {"condition": "service_done"}}
            ),
            "unknown depends_on condition",
        ),
    ],
)
def test_compose_schema_rejects_broken_files(
    compose_schema: dict[str, Any], compose: dict[str, Any], mutate: Any, why: str
) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert _compose_errors(compose_schema, broken), why


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def _payhook_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == "payhook:local"
    }


def test_compose_runs_kafka_in_kraft_mode(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert not any("zookeeper" in name for name in services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    # a KRaft cluster id is a base64url-encoded UUID
    import base64

    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16


def test_compose_has_one_serve_two_consumers_on_postgres(compose: dict[str, Any]) -> None:
    services = _payhook_services(compose)
    commands = sorted(s["command"][0] for s in services.values())
    assert commands == ["consume", "consume", "recover", "serve", "topics"]
    for name, service in services.items():
        env = _env(service)
        assert env["PAYHOOK_KAFKA_IDEMPOTENCE"] == "true", name
        assert env["PAYHOOK_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"] / "deploy/Dockerfile").exists()
        if service["command"] in (["consume"], ["recover"]):
            assert env["PAYHOOK_STORE_URL"].startswith("postgresql://"), name
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        if service["command"] == ["serve"]:
            assert "PAYHOOK_SIGNING_KEYS" in env
            # the spool directory itself is a named volume (not the container's layer)
            named = {
                target: source
                for source, target, *_ in (v.split(":") for v in service["volumes"])
                if source in compose["volumes"]
            }
            assert env["PAYHOOK_SPOOL_DIR"] in named, "spool on a named volume"
    assert compose["services"]["postgres"]["image"].startswith("postgres:")


_ONE_SHOT = {"topics"}


def test_compose_every_service_is_health_checked_and_waited_for(compose: dict[str, Any]) -> None:
    """Every long-running service has a health check; every dependency names its condition:
    healthy for a long-running one, completed for the one-shot topic creation."""
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck", {})
        if name in _ONE_SHOT:
            assert check.get("disable") is True, name
            assert service["restart"] == "no", name
        else:
            assert check.get("test"), f"{name} has no healthcheck"
            assert not check.get("disable"), name
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dependency, condition in depends.items():
            expected = (
                "service_completed_successfully" if dependency in _ONE_SHOT else "service_healthy"
            )
            assert condition == {"condition": expected}, (name, dependency)
    waited = {d for s in services.values() for d in s.get("depends_on", {})}
    # nothing but the observers themselves goes unwaited-for
    assert set(services) - waited == {"grafana"}


def test_compose_kafka_matches_the_topic_settings(compose: dict[str, Any]) -> None:
    """One broker: replication 1 everywhere, said so; min.insync.replicas never above it."""
    kafka = _env(compose["services"]["kafka"])
    brokers = len(kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
    assert brokers == 1
    for name, service in _payhook_services(compose).items():
        env = _env(service)
        replication = int(env["PAYHOOK_TOPIC_REPLICATION"])
        assert replication <= brokers, name
        assert int(kafka["KAFKA_MIN_INSYNC_REPLICAS"]) <= replication, name
        assert int(env["PAYHOOK_EVENTS_RETENTION_MS"]) >= 7 * 24 * 3600 * 1000, name
    assert kafka["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "payhook creates its topics"
    assert kafka["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert "replication 1" in COMPOSE.read_text(), "the single-broker choice is stated"


def test_compose_prometheus_scrapes_the_payhook_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    services = _payhook_services(compose)
    expected = {
        "payhook-serve": [f"{n}:8080" for n, s in services.items() if s["command"] == ["serve"]],
        "payhook-consume": [
            f"{n}:{_env(s)['PAYHOOK_CONSUMER_PORT']}"
            for n, s in services.items()
            if s["command"] == ["consume"]
        ],
        "payhook-recover": [
            f"{n}:{_env(s)['PAYHOOK_RECOVER_PORT']}"
            for n, s in services.items()
            if s["command"] == ["recover"]
        ],
    }
    assert {job: sorted(t) for job, t in targets.items()} == {
        job: sorted(t) for job, t in expected.items()
    }
    assert "alerts.yml" in config["rule_files"]


def test_compose_bind_mounts_exist_and_grafana_is_provisioned(compose: dict[str, Any]) -> None:
    mounts: dict[str, str] = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
                mounts[source] = target
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    providers = yaml.safe_load((provisioning / "dashboards" / "payhook.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert DASHBOARD_JSON.parent.name == "dashboards"


# ---- Dockerfile --------------------------------------------------------------------------------


def _dockerfile() -> list[Any]:
    import dockerfile  # BuildKit's parser: fails on what `docker build` would not parse

    return list(dockerfile.parse_file(str(DOCKERFILE)))


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    commands = _dockerfile()
    stages: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "numeric uid: runAsNonRoot can only verify a number"
    assert int(uid) != 0
    (healthcheck,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD"
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json, "exec form: payhook is PID 1 and gets SIGTERM"
    assert list(entrypoint.value) == ["payhook"]
    env: dict[str, str] = {}
    for command in final:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["PAYHOOK_KAFKA_IDEMPOTENCE"] == "true"
    assert env["PAYHOOK_HTTP_HOST"] == "0.0.0.0"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    included = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    sources = [
        source
        for command in _dockerfile()
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags)
        for source in command.value[:-1]
    ]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert any(source == inc or source.startswith(inc + "/") for inc in included), source


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = run(str(hadolint), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _healthcheck(http_port: int, consumer_port: int, recover_port: int | None = None) -> int:
    env = {
        "PAYHOOK_HTTP_PORT": str(http_port),
        "PAYHOOK_CONSUMER_PORT": str(consumer_port),
        "PAYHOOK_RECOVER_PORT": str(recover_port or free_port()),
    }
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], env=env, timeout=30, check=False
    )
    return result.returncode


def test_container_healthcheck_asks_the_serve_or_the_consumer_port(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, handler = health_server
    closed = free_port()
    assert _healthcheck(port, closed) == 0, "serve answering"
    assert _healthcheck(closed, port) == 0, "consume answering"
    assert _healthcheck(closed, closed, port) == 0, "recover answering"
    assert _healthcheck(closed, free_port()) == 1, "nothing listening"
    handler.status = 503
    assert _healthcheck(port, closed) == 1, "an answer that is not 200"


# ---- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def _servicemonitor_schema() -> dict[str, Any]:
    """JSON Schema of ServiceMonitor from the CRD-generated models, closed to unknown fields."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = ServiceMonitor.model_json_schema(by_alias=True, mode="validation")

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def _validate(resource: dict[str, Any], version: str) -> None:
    if resource["kind"] == "ServiceMonitor":
        jsonschema.Draft202012Validator(_servicemonitor_schema()).validate(resource)
    else:
        # raises SchemaNotFoundError for an unknown kind, never a silent pass
        kubernetes_validate.validate(resource, version, strict=True)


def test_manifests_have_every_required_kind(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Secret", "ServiceMonitor", "HorizontalPodAutoscaler"]
        + ["StatefulSet", "Deployment", "Service"]
        + ["Service", "PodDisruptionBudget"] * 2
        + ["Deployment", "Service"]  # recover: one replica, no disruption budget
    )


def _workloads(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """serve's StatefulSet, the consume and recover Deployments, by name."""
    return {**_by_kind(manifests, "StatefulSet"), **_by_kind(manifests, "Deployment")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_offline(manifests: list[dict[str, Any]], version: str) -> None:
    for resource in manifests:
        _validate(resource, version)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("Deployment", lambda m: m["spec"]["template"]["spec"].update(restartPolcy="Always")),
        ("Deployment", lambda m: m["spec"].update(replicas="two")),
        ("StatefulSet", lambda m: m["spec"].update(volumeClaimTemplate=[])),
        (
            "StatefulSet",
            lambda m: m["spec"]["persistentVolumeClaimRetentionPolicy"].update(whenScale="Retain"),
        ),
        ("HorizontalPodAutoscaler", lambda m: m["spec"].update(maxReplicas=None)),
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(intervall="15s")),
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("ServiceMonitor", lambda m: m["spec"].update(selector="app=payhook")),
    ],
)
def test_validation_rejects_broken_manifests(
    manifests: list[dict[str, Any]], kind: str, mutate: Any
) -> None:
    resource = copy.deepcopy(next(m for m in manifests if m["kind"] == kind))
    mutate(resource)
    with pytest.raises(jsonschema.ValidationError):
        _validate(resource, K8S_VERSIONS[-1])


def test_deployments_probe_resources_and_security(manifests: list[dict[str, Any]]) -> None:
    deployments = _workloads(manifests)
    assert set(deployments) == {"payhook-serve", "payhook-consume", "payhook-recover"}
    assert _by_kind(manifests, "StatefulSet").keys() == {"payhook-serve"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports, (name, probe)
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), name
        assert "memory" in resources["limits"], name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # pods are labelled as the selector says
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    serve = deployments["payhook-serve"]["spec"]["template"]["spec"]
    assert serve["containers"][0]["args"] == ["serve"]
    assert deployments["payhook-consume"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "consume"
    ]
    # one recovery per set of API keys: a single replica, the old pod gone before the new starts
    recover = deployments["payhook-recover"]["spec"]
    assert recover["template"]["spec"]["containers"][0]["args"] == ["recover"]
    assert recover["replicas"] == 1
    assert recover["strategy"]["type"] == "Recreate"
    pre_stop = serve["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = _by_kind(manifests, "ConfigMap")["payhook-config"]["data"]
    settings = load_settings({**config, "PAYHOOK_SIGNING_KEYS": "k1:" + "A" * 24})
    # Before SIGKILL the pod gets the preStop pause, the readiness grace, payhook's shutdown
    # timeout (in-flight requests and the spool's drain) and the producer's final flush.
    assert (
        pre_stop + READINESS_GRACE + settings.shutdown_timeout + settings.publish_timeout
        < serve["terminationGracePeriodSeconds"]
    )
    assert config["PAYHOOK_KAFKA_IDEMPOTENCE"] == "true"


_QUANTITY: Final = re.compile(r"(\d+)(Ki|Mi|Gi|Ti)?")


def parse_quantity(quantity: str) -> int:
    """Bytes of a Kubernetes quantity with a binary suffix (what these manifests use)."""
    match = _QUANTITY.fullmatch(quantity)
    assert match, quantity
    power = ["", "Ki", "Mi", "Gi", "Ti"].index(match.group(2) or "")
    return int(match.group(1)) << (10 * power)


def _spool_storage(statefulset: dict[str, Any], config: dict[str, str]) -> str:
    """What holds serve's spool directory: ``claim`` (a volumeClaimTemplate), ``emptyDir``,
    ``container`` (nothing mounted: the container's own layer) or another volume type."""
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    spool_dir = Path(env.get("PAYHOOK_SPOOL_DIR") or config["PAYHOOK_SPOOL_DIR"])
    # the innermost mount that holds the directory decides where its files go
    holders = [
        m
        for m in container.get("volumeMounts", [])
        if spool_dir == Path(m["mountPath"]) or Path(m["mountPath"]) in spool_dir.parents
    ]
    if not holders:
        return "container"
    mount = max(holders, key=lambda m: len(Path(m["mountPath"]).parts))
    claims = {t["metadata"]["name"] for t in statefulset["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if mount["name"] in volumes:
        # a pod volume shadows a claim template of the same name
        (kind,) = set(volumes[mount["name"]]) - {"name"}
        return str(kind)
    assert mount["name"] in claims, f"mount {mount['name']} names no volume"
    return "claim"


def test_serve_spool_is_on_a_volume_claim_kept_on_scale_down(
    manifests: list[dict[str, Any]],
) -> None:
    serve = _by_kind(manifests, "StatefulSet")["payhook-serve"]
    config = _by_kind(manifests, "ConfigMap")["payhook-config"]["data"]
    assert _spool_storage(serve, config) == "claim"
    (template,) = serve["spec"]["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    settings = load_settings({**config, "PAYHOOK_SIGNING_KEYS": "k1:" + "A" * 24})
    claim_bytes = parse_quantity(template["spec"]["resources"]["requests"]["storage"])
    assert claim_bytes > settings.spool_max_bytes
    # scale-down and deletion keep the claims: a spool is drained, never deleted with its pod
    assert serve["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    # the pod can write there: fsGroup owns the claim
    assert serve["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


@pytest.mark.parametrize(
    ("mutate", "storage"),
    [
        # the spool in an emptyDir again (what issue 13 replaced)
        (
            lambda s: s["spec"]["template"]["spec"]["volumes"].append(
                {"name": "spool", "emptyDir": {}}
            ),
            "emptyDir",
        ),
        # the pod's emptyDir mounted at the spool directory instead of the claim
        (
            lambda s: s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].update(
                name="tmp"
            ),
            "emptyDir",
        ),
        # the claim mounted elsewhere
        (
            lambda s: s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].update(
                mountPath="/var/lib/payhook/data"
            ),
            "container",
        ),
        # the env points the spool somewhere else
        (
            lambda s: s["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "PAYHOOK_SPOOL_DIR", "value": "/tmp/spool"}  # noqa: S108 - a manifest path
            ),
            "emptyDir",
        ),
    ],
)
def test_spool_storage_check_tells_a_claim_from_the_rest(
    manifests: list[dict[str, Any]], mutate: Any, storage: str
) -> None:
    serve = copy.deepcopy(_by_kind(manifests, "StatefulSet")["payhook-serve"])
    config = _by_kind(manifests, "ConfigMap")["payhook-config"]["data"]
    mutate(serve)
    assert _spool_storage(serve, config) == storage


def _pod_labels(manifests: list[dict[str, Any]], component: str) -> dict[str, str]:
    deployment = _workloads(manifests)[f"payhook-{component}"]
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def test_services_pdbs_and_hpa_point_at_the_deployments(manifests: list[dict[str, Any]]) -> None:
    deployments = _workloads(manifests)
    for component in ("serve", "consume"):
        name = f"payhook-{component}"
        labels = _pod_labels(manifests, component)
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        port_names = {p["name"] for p in container["ports"]}
        service = _by_kind(manifests, "Service")[name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        pdb = _by_kind(manifests, "PodDisruptionBudget")[name]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # other component's pods must not match
        other = _pod_labels(manifests, "consume" if component == "serve" else "serve")
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= other.items()
    recover = _by_kind(manifests, "Service")["payhook-recover"]
    assert recover["spec"]["selector"].items() <= _pod_labels(manifests, "recover").items()
    for component in ("serve", "consume"):
        pdb = _by_kind(manifests, "PodDisruptionBudget")[f"payhook-{component}"]
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= (
            _pod_labels(manifests, "recover").items()
        )
    (hpa,) = _by_kind(manifests, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "StatefulSet",
        "payhook-serve",
    )
    pdb = _by_kind(manifests, "PodDisruptionBudget")["payhook-serve"]
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "one pod keeps serving"
    # scale-down one pod at a time, slowly
    (policy,) = hpa["spec"]["behavior"]["scaleDown"]["policies"]
    assert (policy["type"], policy["value"]) == ("Pods", 1)
    # the StatefulSet's governing Service exists, is headless and selects its pods
    serve = _by_kind(manifests, "StatefulSet")["payhook-serve"]
    governing = _by_kind(manifests, "Service")[serve["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= _pod_labels(manifests, "serve").items()


def test_secret_holds_what_the_deployments_reference(manifests: list[dict[str, Any]]) -> None:
    secrets = _by_kind(manifests, "Secret")
    configmaps = _by_kind(manifests, "ConfigMap")
    referenced_keys: set[str] = set()
    for deployment in _workloads(manifests).values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in configmaps
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets
                assert ref["key"] in secrets[ref["name"]]["stringData"]
                referenced_keys.add(ref["key"])
    assert {"PAYHOOK_SIGNING_KEYS", "PAYHOOK_STORE_URL"} <= referenced_keys
    # no secret leaks into the ConfigMap
    for configmap in configmaps.values():
        assert not {"PAYHOOK_SIGNING_KEYS", "PAYHOOK_CRYPTOPOS_SECRET"} & configmap["data"].keys()


def test_placeholder_signing_keys_fail_fast() -> None:
    """The committed Secret is a template: payhook must refuse to start with it."""
    from service.settings import SettingsError, load_settings

    secret = next(
        d for d in yaml.safe_load_all((K8S / "20-secret.yaml").read_text()) if d["kind"] == "Secret"
    )
    with pytest.raises(SettingsError, match="PAYHOOK_SIGNING_KEYS"):
        load_settings(secret["stringData"])


def test_servicemonitor_scrapes_both_services(manifests: list[dict[str, Any]]) -> None:
    (monitor,) = _by_kind(manifests, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = _by_kind(manifests, "Service")
    selected = {
        n for n, s in services.items() if selector.items() <= s["metadata"]["labels"].items()
    }
    assert selected == {"payhook-serve", "payhook-consume", "payhook-recover"}
    port_names = {p["name"] for s in services.values() for p in s["spec"]["ports"]}
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoint_ports == port_names
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # alert PayhookTargetDown matches jobs named after the Services
    (down,) = [r for r in alert_rules() if r.get("alert") == "PayhookTargetDown"]
    job_regex = re.search(r'job=~"([^"]+)"', down["expr"])
    assert job_regex
    assert all(re.fullmatch(job_regex.group(1), name) for name in selected)


# ---- Grafana dashboard ------------------------------------------------------------------------


def _dashboard_module() -> ModuleType:
    path = DEPLOY / "grafana" / "dashboard.py"
    spec = importlib.util.spec_from_file_location("payhook_dashboard", path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_generated_and_current() -> None:
    rendered = _dashboard_module().render()
    assert DASHBOARD_JSON.read_text() == rendered, (
        "deploy/grafana/dashboards/payhook.json is stale: run "
        ".venv/bin/python deploy/grafana/dashboard.py"
    )


def test_dashboard_panels_are_well_formed() -> None:
    doc = json.loads(DASHBOARD_JSON.read_text())
    assert doc["uid"] == "payhook"
    (variable,) = doc["templating"]["list"]
    assert (variable["type"], variable["name"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    queried = 0
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(ref_ids), panel["title"]
        queried += len(ref_ids)
    assert queried >= 20
