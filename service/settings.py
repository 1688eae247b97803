"""Settings, read once from the environment into a frozen object.

A missing or malformed required value fails fast with a message naming the variable. Secrets
are wrapped in :class:`Secret`, whose ``repr`` and ``str`` never show the value.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@final
class Secret:
    """A secret value that hides itself when printed or logged."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@final
@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    key: Secret


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    signing_keys: tuple[SigningKey, ...]
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "payhook"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    consumer_port: int = 8081
    public_url: str = "http://127.0.0.1:8080"
    max_body_bytes: int = 65536
    auth_failure_budget: int = 20
    cryptopos_secret: Secret | None = None
    store_url: str = "sqlite:///var/payhook.db"
    spool_dir: Path = field(default_factory=lambda: Path("var/spool"))
    log_format: str = "json"
    topic_partitions: int = 4
    topic_replication: int | None = None  # None: min(3, brokers)
    events_retention_ms: int = 30 * 24 * 3600 * 1000
    # Beyond the documented contract: operational knobs with safe defaults.
    kafka_idempotence: bool = False
    publish_timeout: float = 2.0
    # A request body must arrive within it (from the request's headers), else the connection
    # is closed: a slow client cannot hold a connection and a handler open.
    body_timeout: float = 10.0
    spool_max_bytes: int = 256 * 1024 * 1024
    shutdown_timeout: float = 15.0
    consumer_group: str = "payhook-consumer"
    consumer_session_timeout_ms: int = 10000
    consumer_batch_max: int = 500
    commit_timeout: float = 10.0
    # payhook recover: each provider's API settings (its recovery is off without them).
    bitfinex_api_url: str = "https://api.bitfinex.com"
    bitfinex_api_key: Secret | None = None
    bitfinex_api_secret: Secret | None = None
    cryptosteroid_api_url: str | None = None
    cryptosteroid_api_key: Secret | None = None
    cryptosteroid_merchant_id: str | None = None
    cryptopos_api_url: str | None = None
    cryptopos_api_key: Secret | None = None
    cryptopos_merchant_id: str | None = None
    recover_interval: float = 300.0
    recover_lookback: float = 172800.0
    recover_port: int = 8082

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.invoice-events.v1"

    @property
    def settlements_topic(self) -> str:
        return f"{self.topic_prefix}.settlements.v1"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.invoice-events.dlq.v1"

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.events_topic, self.settlements_topic, self.dlq_topic)


# The settings each provider's recovery needs, by variable name and field.
RECOVERY_SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "bitfinex": (
        ("PAYHOOK_BITFINEX_API_KEY", "bitfinex_api_key"),
        ("PAYHOOK_BITFINEX_API_SECRET", "bitfinex_api_secret"),
    ),
    "cryptosteroid": (
        ("PAYHOOK_CRYPTOSTEROID_API_URL", "cryptosteroid_api_url"),
        ("PAYHOOK_CRYPTOSTEROID_API_KEY", "cryptosteroid_api_key"),
        ("PAYHOOK_CRYPTOSTEROID_MERCHANT_ID", "cryptosteroid_merchant_id"),
    ),
    "cryptopos": (
        ("PAYHOOK_CRYPTOPOS_API_URL", "cryptopos_api_url"),
        ("PAYHOOK_CRYPTOPOS_API_KEY", "cryptopos_api_key"),
        ("PAYHOOK_CRYPTOPOS_MERCHANT_ID", "cryptopos_merchant_id"),
    ),
}


def recovery_missing(settings: Settings, provider: str) -> tuple[str, ...]:
    """The variables ``provider``'s recovery lacks; empty when it can be swept."""
    return tuple(
        name for name, attr in RECOVERY_SETTINGS[provider] if getattr(settings, attr) is None
    )


def parse_signing_keys(raw: str) -> tuple[SigningKey, ...]:
    """``kid:base64key[,kid:base64key...]``; the first mints, all verify."""
    keys: list[SigningKey] = []
    seen: set[str] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, encoded = part.partition(":")
        if not sep or not kid or not encoded:
            raise SettingsError("PAYHOOK_SIGNING_KEYS: each entry must be kid:base64key")
        if "." in kid:
            raise SettingsError(f"PAYHOOK_SIGNING_KEYS: key id {kid!r} must not contain '.'")
        if kid in seen:
            raise SettingsError(f"PAYHOOK_SIGNING_KEYS: key id {kid!r} appears twice")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(
                f"PAYHOOK_SIGNING_KEYS: key {kid!r} is not standard base64"
            ) from None
        if len(key) < 16:
            raise SettingsError(f"PAYHOOK_SIGNING_KEYS: key {kid!r} is shorter than 16 bytes")
        seen.add(kid)
        keys.append(SigningKey(kid=kid, key=Secret(key)))
    return tuple(keys)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _retention_ms(env: Mapping[str, str], name: str, default: int) -> int:
    """Milliseconds, or -1 for "keep forever" (Kafka's own spelling)."""
    value = _int(env, name, default, minimum=-1)
    if value == 0:
        raise SettingsError(f"{name} must be positive (or -1: keep forever), got 0")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


# Hosts that mean "every interface": a URL to reach them goes through the loopback.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "[::]", "*"})


def local_url(host: str, port: int) -> str:
    """``http://host:port`` for an address payhook listens on, as a client on this machine
    reaches it (the loopback for a wildcard host; brackets for an IPv6 address)."""
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must start with http:// or https://")
    return raw.rstrip("/")


def _secret(env: Mapping[str, str], name: str) -> Secret | None:
    raw = env.get(name)
    return Secret(raw.encode()) if raw else None


def load_settings(
    env: Mapping[str, str] | None = None, *, require_signing_keys: bool = True
) -> Settings:
    """Reads every ``PAYHOOK_*`` variable once. Raises :class:`SettingsError`.

    The consumer never mints or verifies secrets, so it may run without signing keys.
    """
    env = os.environ if env is None else env
    signing_keys = parse_signing_keys(env.get("PAYHOOK_SIGNING_KEYS", ""))
    if require_signing_keys and not signing_keys:
        raise SettingsError("PAYHOOK_SIGNING_KEYS is required: kid:base64key[,kid:base64key...]")
    log_format = env.get("PAYHOOK_LOG_FORMAT", "json") or "json"
    if log_format not in {"json", "console"}:
        raise SettingsError(f"PAYHOOK_LOG_FORMAT must be json or console, got {log_format!r}")
    store_url = env.get("PAYHOOK_STORE_URL") or "sqlite:///var/payhook.db"
    if not store_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise SettingsError("PAYHOOK_STORE_URL must start with sqlite:/// or postgresql://")
    cryptopos = env.get("PAYHOOK_CRYPTOPOS_SECRET")
    http_host = env.get("PAYHOOK_HTTP_HOST") or "127.0.0.1"
    http_port = _int(env, "PAYHOOK_HTTP_PORT", 8080)
    return Settings(
        signing_keys=signing_keys,
        kafka_bootstrap=env.get("PAYHOOK_KAFKA_BOOTSTRAP") or "127.0.0.1:9092",
        topic_prefix=env.get("PAYHOOK_TOPIC_PREFIX") or "payhook",
        http_host=http_host,
        http_port=http_port,
        consumer_port=_int(env, "PAYHOOK_CONSUMER_PORT", 8081),
        public_url=(env.get("PAYHOOK_PUBLIC_URL") or local_url(http_host, http_port)).rstrip("/"),
        max_body_bytes=_int(env, "PAYHOOK_MAX_BODY_BYTES", 65536, minimum=1),
        auth_failure_budget=_int(env, "PAYHOOK_AUTH_FAILURE_BUDGET", 20),
        cryptopos_secret=Secret(cryptopos.encode()) if cryptopos else None,
        store_url=store_url,
        spool_dir=Path(env.get("PAYHOOK_SPOOL_DIR") or "var/spool"),
        log_format=log_format,
        topic_partitions=_int(env, "PAYHOOK_TOPIC_PARTITIONS", 4, minimum=1),
        topic_replication=(
            _int(env, "PAYHOOK_TOPIC_REPLICATION", 0, minimum=1)
            if env.get("PAYHOOK_TOPIC_REPLICATION")
            else None
        ),
        events_retention_ms=_retention_ms(
            env, "PAYHOOK_EVENTS_RETENTION_MS", 30 * 24 * 3600 * 1000
        ),
        kafka_idempotence=_bool(env, "PAYHOOK_KAFKA_IDEMPOTENCE", False),
        publish_timeout=_float(env, "PAYHOOK_PUBLISH_TIMEOUT", 2.0),
        body_timeout=_float(env, "PAYHOOK_BODY_TIMEOUT", 10.0),
        spool_max_bytes=_int(env, "PAYHOOK_SPOOL_MAX_BYTES", 256 * 1024 * 1024, minimum=1),
        shutdown_timeout=_float(env, "PAYHOOK_SHUTDOWN_TIMEOUT", 15.0),
        consumer_group=env.get("PAYHOOK_CONSUMER_GROUP") or "payhook-consumer",
        consumer_session_timeout_ms=_int(env, "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS", 10000, 1),
        consumer_batch_max=_int(env, "PAYHOOK_CONSUMER_BATCH_MAX", 500, minimum=1),
        commit_timeout=_float(env, "PAYHOOK_COMMIT_TIMEOUT", 10.0),
        bitfinex_api_url=_url(env, "PAYHOOK_BITFINEX_API_URL") or "https://api.bitfinex.com",
        bitfinex_api_key=_secret(env, "PAYHOOK_BITFINEX_API_KEY"),
        bitfinex_api_secret=_secret(env, "PAYHOOK_BITFINEX_API_SECRET"),
        cryptosteroid_api_url=_url(env, "PAYHOOK_CRYPTOSTEROID_API_URL"),
        cryptosteroid_api_key=_secret(env, "PAYHOOK_CRYPTOSTEROID_API_KEY"),
        cryptosteroid_merchant_id=env.get("PAYHOOK_CRYPTOSTEROID_MERCHANT_ID") or None,
        cryptopos_api_url=_url(env, "PAYHOOK_CRYPTOPOS_API_URL"),
        cryptopos_api_key=_secret(env, "PAYHOOK_CRYPTOPOS_API_KEY"),
        cryptopos_merchant_id=env.get("PAYHOOK_CRYPTOPOS_MERCHANT_ID") or None,
        recover_interval=_float(env, "PAYHOOK_RECOVER_INTERVAL", 300.0),
        recover_lookback=_float(env, "PAYHOOK_RECOVER_LOOKBACK", 172800.0),
        recover_port=_int(env, "PAYHOOK_RECOVER_PORT", 8082),
    )
