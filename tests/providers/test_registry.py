"""The provider registry: the runtime's one list of providers, agreeing with the schemas."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

from schemas.events import PROVIDERS as SCHEMA_PROVIDERS
from schemas.events import Provider
from service import providers
from tests.fixtures_app import SEED_003, cryptopos_body, cryptopos_data, cryptosteroid, encode


def test_the_registry_names_every_provider_the_events_may_carry() -> None:
    assert set(providers.PROVIDERS) == set(typing.get_args(Provider)) == set(SCHEMA_PROVIDERS)
    assert set(providers.PER_ORDER).isdisjoint(providers.MERCHANT_SIGNED)
    assert {**providers.PER_ORDER, **providers.MERCHANT_SIGNED} == providers.PROVIDERS


def test_each_provider_is_registered_under_its_name_and_says_how_it_authenticates() -> None:
    for name, provider in providers.PROVIDERS.items():
        assert providers.get(name) is provider
        assert provider.name == name
    assert {p.authentication for p in providers.PER_ORDER.values()} == {"per_order"}
    assert {p.authentication for p in providers.MERCHANT_SIGNED.values()} == {"merchant_signature"}


def test_each_provider_normalizes_into_events_that_carry_its_name() -> None:
    at = datetime(2024, 10, 1, tzinfo=UTC)
    _, pos_data = providers.cryptopos.split(cryptopos_body(cryptopos_data()))
    bodies = {
        "bitfinex": SEED_003,
        "cryptosteroid": encode(cryptosteroid()),
        "cryptopos": pos_data,
    }
    for name, body in bodies.items():
        provider = providers.get(name)
        event = provider.normalize(provider.decode(body), at)
        assert event.provider == name
        assert event.received_at == at


def test_running_totals_are_what_the_providers_say() -> None:
    assert {"cryptosteroid", "cryptopos"} == providers.RUNNING_TOTAL_PROVIDERS
