"""A real Kafka-protocol broker (Tansu) for the whole session, and settings that point at it.

Each test gets its own topic prefix, so tests never see each other's records.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.devbroker import LocalBroker
from service.settings import Settings, load_settings

TEST_KEY_CURRENT = base64.b64encode(b"k" * 32).decode()
TEST_KEY_OLD = base64.b64encode(b"o" * 32).decode()
TEST_ENV: dict[str, str] = {
    "PAYHOOK_SIGNING_KEYS": f"k2:{TEST_KEY_CURRENT},k1:{TEST_KEY_OLD}",
    "PAYHOOK_CRYPTOPOS_SECRET": "cryptopos-merchant-secret",
    "PAYHOOK_LOG_FORMAT": "json",
}

_prefixes = itertools.count()

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def unreachable() -> Iterator[str]:
    """``127.0.0.1:PORT`` that refuses every connection for the whole test: the port stays
    bound, never listening. A port merely found free and let go can be handed to the next
    bind to port 0, the test's own HTTP server's included: a producer then spoke Kafka to it,
    and the test saw a second request line (a 400 for the Kafka bytes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with LocalBroker(log_path=log) as broker:
        yield broker


@pytest.fixture
def settings_factory(tmp_path: Path) -> SettingsFactory:
    """Builds Settings from the test environment; keyword arguments override fields."""

    def make(**overrides: Any) -> Settings:
        base = load_settings(TEST_ENV)
        fields: dict[str, Any] = {
            "topic_prefix": f"t{next(_prefixes)}",
            "spool_dir": tmp_path / "spool",
            "store_url": f"sqlite:///{tmp_path / 'payhook.db'}",
        }
        fields.update(overrides)
        return dataclasses.replace(base, **fields)

    return make


@pytest.fixture
def kafka_settings(kafka_broker: LocalBroker, settings_factory: SettingsFactory) -> Settings:
    """Settings pointing at the session broker, with a fresh topic prefix."""
    return settings_factory(kafka_bootstrap=kafka_broker.bootstrap)
