"""Per-order secrets and the failure budget: pure, no I/O."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.ingest.secrets import (
    FailureLimiter,
    mint_secret,
    verify_secret,
    webhook_url,
)
from service.settings import Settings, load_settings, parse_signing_keys
from tests.fixtures_kafka import TEST_ENV

KEYS = parse_signing_keys(TEST_ENV["PAYHOOK_SIGNING_KEYS"])  # k2 mints, k1 verifies too


def settings() -> Settings:
    return load_settings(TEST_ENV)


def test_secret_is_kid_dot_unpadded_base64url_hmac() -> None:
    secret = mint_secret(KEYS, "bitfinex", "order123")
    kid, _, mac = secret.partition(".")
    assert kid == "k2"
    assert "=" not in mac
    expected = hmac.new(KEYS[0].key.reveal(), b"bitfinex:order123", hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)) == expected


def test_minted_secret_verifies_for_its_order_only() -> None:
    secret = mint_secret(KEYS, "bitfinex", "order123")
    assert verify_secret(KEYS, "bitfinex", "order123", secret)
    assert not verify_secret(KEYS, "bitfinex", "order124", secret)
    assert not verify_secret(KEYS, "cryptosteroid", "order123", secret)


def test_rotation_old_key_still_verifies_new_key_mints() -> None:
    old_only = KEYS[1:]
    issued_before = mint_secret(old_only, "cryptosteroid", "o-1")
    assert issued_before.startswith("k1.")
    assert verify_secret(KEYS, "cryptosteroid", "o-1", issued_before)
    assert mint_secret(KEYS, "cryptosteroid", "o-1").startswith("k2.")
    # Once the old key is retired, its secrets stop working.
    assert not verify_secret(KEYS[:1], "cryptosteroid", "o-1", issued_before)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s + "=",  # padded variant
        lambda s: s + "==",
        lambda s: s[:-1],
        lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"),
        lambda s: s.replace("k2.", "k1."),  # right mac, wrong key id
        lambda s: s.replace("k2.", "k9."),  # unknown key id
        lambda s: s.partition(".")[2],  # no key id
        lambda s: s.upper(),
        lambda s: " " + s,
        lambda s: s + "é",
        lambda s: "",
    ],
)
def test_tampered_secret_is_refused(tamper: object) -> None:
    secret = mint_secret(KEYS, "bitfinex", "order123")
    assert callable(tamper)
    presented = tamper(secret)
    assert presented != secret
    assert not verify_secret(KEYS, "bitfinex", "order123", presented)


@given(st.text(max_size=80))
def test_arbitrary_strings_never_verify_nor_raise(presented: str) -> None:
    assert not verify_secret(KEYS, "bitfinex", "order123", presented)


def test_webhook_url_carries_token_for_bitfinex_only() -> None:
    s = dataclasses.replace(settings(), public_url="https://hooks.example.com")
    url = urlsplit(webhook_url(s, "bitfinex", "order/1 2"))
    assert url.path == "/v1/webhooks/bitfinex/order%2F1%202"
    (token,) = parse_qs(url.query)["token"]
    assert verify_secret(s.signing_keys, "bitfinex", "order/1 2", token)

    cs = urlsplit(webhook_url(s, "cryptosteroid", "o-1"))
    assert cs.path == "/v1/webhooks/cryptosteroid/o-1"
    assert cs.query == ""
    with pytest.raises(ValueError, match="cryptopos"):
        webhook_url(s, "cryptopos", "o-1")


def test_mint_needs_a_key() -> None:
    with pytest.raises(ValueError, match="no signing key"):
        mint_secret((), "bitfinex", "o")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_refuses_past_the_budget_within_a_minute() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, clock)
    assert [limiter.fail("a") for _ in range(3)] == [False, False, False]
    assert limiter.fail("a")  # fourth within the minute
    assert not limiter.fail("b")  # per address


def test_limiter_window_slides_and_refused_requests_count() -> None:
    clock = Clock()
    limiter = FailureLimiter(2, clock)
    limiter.fail("a")  # t=1000
    clock.now += 30
    limiter.fail("a")  # t=1030
    clock.now += 20
    assert limiter.fail("a")  # t=1050: two in the last minute -> refused, and counted
    clock.now += 15  # t=1065: 1000 left the window, but 1030 and 1050 remain
    assert limiter.fail("a")
    clock.now += 60  # t=1125: 1050 and 1065 have left; nothing recent
    assert not limiter.fail("a")


def test_limiter_budget_zero_refuses_every_failure() -> None:
    assert FailureLimiter(0, Clock()).fail("a")


def test_limiter_forgets_idle_addresses() -> None:
    clock = Clock()
    limiter = FailureLimiter(5, clock)
    for i in range(1000):
        limiter.fail(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 1000
    clock.now += 61
    for _ in range(30):
        limiter.fail("fresh")
    assert len(limiter) == 1
