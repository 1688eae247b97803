"""The ``payhook`` command, run in-process with a controlled environment."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from devtools.devbroker import LocalBroker
from devtools.devrun import dev_signing_keys
from service import __version__
from service.cli import main
from service.ingest.secrets import verify_secret
from service.settings import Settings, parse_signing_keys
from tests.fixtures_kafka import TEST_ENV


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PAYHOOK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PAYHOOK_SIGNING_KEYS", TEST_ENV["PAYHOOK_SIGNING_KEYS"])
    monkeypatch.setenv("PAYHOOK_PUBLIC_URL", "https://hooks.example.com/")


def lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


KEYS = parse_signing_keys(TEST_ENV["PAYHOOK_SIGNING_KEYS"])


def test_secret_for_bitfinex_puts_the_token_in_the_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["secret", "--provider", "bitfinex", "order 7"]) == 0
    printed = lines(capsys.readouterr().out)
    secret, url = printed["secret"], urlsplit(printed["url"])
    assert verify_secret(KEYS, "bitfinex", "order 7", secret)
    assert (url.scheme, url.netloc, url.path) == (
        "https",
        "hooks.example.com",
        "/v1/webhooks/bitfinex/order%207",
    )
    assert parse_qs(url.query)["token"] == [secret]


def test_secret_for_cryptosteroid_goes_in_the_token_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["secret", "--provider", "cryptosteroid", "o-1"]) == 0
    printed = lines(capsys.readouterr().out)
    assert verify_secret(KEYS, "cryptosteroid", "o-1", printed["secret"])
    assert printed["url"] == "https://hooks.example.com/v1/webhooks/cryptosteroid/o-1"


def test_secret_for_cryptopos_exits_2_and_explains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["secret", "--provider", "cryptopos", "o-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "https://hooks.example.com/v1/webhooks/cryptopos" in captured.err


def test_secret_without_signing_keys_fails_fast(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PAYHOOK_SIGNING_KEYS")
    assert main(["secret", "--provider", "bitfinex", "o-1"]) == 2
    assert "PAYHOOK_SIGNING_KEYS" in capsys.readouterr().err


def test_unknown_provider_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["secret", "--provider", "paypal", "o-1"])
    assert exited.value.code == 2


def test_topics_creates_then_finds_them(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_broker: LocalBroker,
) -> None:
    monkeypatch.delenv("PAYHOOK_SIGNING_KEYS")  # not needed for topics
    monkeypatch.setenv("PAYHOOK_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    monkeypatch.setenv("PAYHOOK_TOPIC_PREFIX", "cli-topics")
    for _ in range(2):  # the second run finds them: "already exists" is not an error
        assert main(["topics"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out == [
            "cli-topics.invoice-events.v1: ok",
            "cli-topics.settlements.v1: ok",
            "cli-topics.invoice-events.dlq.v1: ok",
        ]


def test_topics_reports_an_unreachable_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], unreachable: str
) -> None:
    monkeypatch.setenv("PAYHOOK_KAFKA_BOOTSTRAP", unreachable)
    assert main(["topics"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert all("cannot reach Kafka" in line for line in err)


def test_consume_runs_the_consumer_without_signing_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.consume.process

    monkeypatch.delenv("PAYHOOK_SIGNING_KEYS")
    monkeypatch.setenv("PAYHOOK_TOPIC_PREFIX", "cli-consume")
    seen: list[Settings] = []

    def run(settings: Settings) -> int:
        seen.append(settings)
        return 3

    monkeypatch.setattr(service.consume.process, "run", run)
    assert main(["consume"]) == 3
    assert [s.topic_prefix for s in seen] == ["cli-consume"]
    assert seen[0].signing_keys == ()


def test_dev_signing_key_is_made_once_for_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "var" / "dev-signing-keys"
    first = dev_signing_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dev_signing_keys(path) == first
    (key,) = parse_signing_keys(first)
    assert key.kid == "dev"
    assert len(key.key.reveal()) == 32


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"payhook {__version__}\n"


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out
    assert "consume" in out
    assert "``" not in out
    assert ":class:" not in out
