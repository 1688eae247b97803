"""``make run``'s launcher: the checks it makes before it starts anything."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import devrun
from devtools.devbroker import free_port
from service.settings import Settings, load_settings
from tests.fixtures_kafka import TEST_ENV


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something listens on for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def dev_settings(**env: str) -> Settings:
    return load_settings(
        {
            "PAYHOOK_SIGNING_KEYS": TEST_ENV["PAYHOOK_SIGNING_KEYS"],
            "PAYHOOK_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "PAYHOOK_HTTP_PORT": str(free_port()),
            "PAYHOOK_CONSUMER_PORT": str(free_port()),
            **env,
        }
    )


def test_free_ports_are_not_reported() -> None:
    assert devrun.busy_ports(dev_settings()) == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYHOOK_KAFKA_BOOTSTRAP", "127.0.0.1:{port}"),
        ("PAYHOOK_HTTP_PORT", "{port}"),
        ("PAYHOOK_CONSUMER_PORT", "{port}"),
    ],
)
def test_a_busy_port_is_named_with_the_setting_that_moves_it(
    held_port: int, variable: str, value: str
) -> None:
    busy = devrun.busy_ports(dev_settings(**{variable: value.format(port=held_port)}))
    assert len(busy) == 1
    assert str(held_port) in busy[0]
    assert variable in busy[0]


def test_a_busy_consumer_port_stops_the_run_before_anything_starts(
    held_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker_port = free_port()
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("PAYHOOK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PAYHOOK_SIGNING_KEYS", TEST_ENV["PAYHOOK_SIGNING_KEYS"])
    monkeypatch.setenv("PAYHOOK_KAFKA_BOOTSTRAP", f"127.0.0.1:{broker_port}")
    monkeypatch.setenv("PAYHOOK_HTTP_PORT", str(free_port()))
    monkeypatch.setenv("PAYHOOK_CONSUMER_PORT", str(held_port))
    assert devrun.main() == 1
    err = capsys.readouterr().err
    assert "PAYHOOK_CONSUMER_PORT" in err
    assert "Traceback" not in err
    # Nothing was started or created: no broker, no store.
    assert not devrun._port_in_use("127.0.0.1", broker_port)
    assert not (tmp_path / "var").exists()


def test_each_run_starts_with_a_fresh_local_store(tmp_path: Path) -> None:
    store = tmp_path / "dev" / "payhook.db"
    store.parent.mkdir()
    for name in ("payhook.db", "payhook.db-wal", "payhook.db-shm"):
        (store.parent / name).write_bytes(b"old")
    env: dict[str, str] = {}
    line = devrun.fresh_dev_store(env, store)
    assert env["PAYHOOK_STORE_URL"] == f"sqlite:///{store}"
    assert list(store.parent.iterdir()) == []
    assert "fresh local store" in line


def test_a_store_set_by_the_user_is_kept_and_the_run_says_so(tmp_path: Path) -> None:
    store = tmp_path / "dev" / "payhook.db"
    env = {"PAYHOOK_STORE_URL": "sqlite:///elsewhere.db"}
    line = devrun.fresh_dev_store(env, store)
    assert env == {"PAYHOOK_STORE_URL": "sqlite:///elsewhere.db"}
    assert not store.parent.exists()
    assert "PAYHOOK_STORE_URL is set" in line


def test_the_summary_names_the_configured_addresses() -> None:
    settings = dev_settings(PAYHOOK_HTTP_PORT="18080", PAYHOOK_CONSUMER_PORT="18081")
    line = devrun.summary(settings, "127.0.0.1:19092")
    assert "http://127.0.0.1:18080" in line
    assert "http://127.0.0.1:18081" in line
    assert "127.0.0.1:19092" in line
    assert ":8080" not in line
