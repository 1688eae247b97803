"""The CryptoSteroid and Crypto POS status clients against their simulators."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import msgspec
import pytest

from service.providers import cryptopos, cryptosteroid
from service.providers.api import (
    ApiError,
    CredentialsRejected,
    InvoiceUnavailable,
    StatusApi,
    Unavailable,
)
from service.providers.cryptopos import CRYPTOPOS
from service.settings import Secret
from tests.recover.conftest import (
    CS_KEY,
    CS_MERCHANT,
    FAST_POLICY,
    POS_KEY,
    Serve,
)
from tests.recover.simulators import (
    CUSTOMER_EMAIL,
    CryptoPosSimulator,
    CryptoSteroidSimulator,
    ManualClock,
    cryptopos_invoice,
    cryptosteroid_invoice,
    encode,
)

RECEIVED = datetime(2026, 12, 1, tzinfo=UTC)
Simulator = CryptoSteroidSimulator | CryptoPosSimulator


async def started(
    serve: Serve,
    sim: Simulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    *,
    key: str | None = None,
) -> tuple[StatusApi, str]:
    """The simulator holding one invoice, started; its client (with ``key``, or the right
    one) and that invoice's id."""
    if isinstance(sim, CryptoSteroidSimulator):
        invoice_id, endpoint = "cs-0001", cryptosteroid.status_endpoint
        sim.invoices[invoice_id] = cryptosteroid_invoice(
            1, "WAITING", "40.25", updated_at="2026-11-30T10:05:00Z", hashes=["h1"]
        )
    else:
        invoice_id, endpoint = "pos-0001", cryptopos.status_endpoint
        sim.invoices[invoice_id] = cryptopos_invoice(
            1, [("0xa", "10.5", "2026-11-30T10:01:00.000Z"), ("0xb", "5", "2026-11-30T10:02:00Z")]
        )
    url = await serve(sim.app())
    api = StatusApi(
        http,
        endpoint(url, Secret((key or sim.api_key).encode()), sim.merchant_id),
        clock=clock,
        policy=FAST_POLICY,
    )
    return api, invoice_id


async def test_cryptosteroid_reads_the_invoice_as_its_notification_would(
    serve: Serve,
    cryptosteroid_sim: CryptoSteroidSimulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
) -> None:
    api, invoice_id = await started(serve, cryptosteroid_sim, clock, http)
    event = await api.fetch(invoice_id, RECEIVED)
    assert event.origin == "recovery"
    assert event.paid_total == Decimal("40.25")
    assert event.status == "pending"
    assert event.order_id == "cs-order-1"


async def test_cryptopos_reads_data_as_its_callback_would_without_personal_data(
    serve: Serve,
    cryptopos_sim: CryptoPosSimulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
) -> None:
    api, invoice_id = await started(serve, cryptopos_sim, clock, http)
    event = await api.fetch(invoice_id, RECEIVED)
    data = encode(cryptopos_sim.invoices[invoice_id])
    webhook = CRYPTOPOS.normalize(CRYPTOPOS.decode(data), RECEIVED)
    assert event.event_id == webhook.event_id
    assert event.paid_total == Decimal("15.5")
    encoded = msgspec.json.encode(event)
    assert CUSTOMER_EMAIL.encode() not in encoded
    assert b"0x2F67f1426f33E25A920F0b2139cd460fDfb8997C" not in encoded  # the sender's wallet


@pytest.mark.parametrize("which", ["cryptosteroid", "cryptopos"])
async def test_wrong_credentials_name_the_settings_and_are_not_retried(
    serve: Serve,
    cryptosteroid_sim: CryptoSteroidSimulator,
    cryptopos_sim: CryptoPosSimulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    which: str,
) -> None:
    sim: Simulator = cryptosteroid_sim if which == "cryptosteroid" else cryptopos_sim
    api, invoice_id = await started(serve, sim, clock, http, key="nope")
    with pytest.raises(CredentialsRejected) as raised:
        await api.fetch(invoice_id, RECEIVED)
    assert f"PAYHOOK_{which.upper()}_API_KEY" in str(raised.value)
    assert f"PAYHOOK_{which.upper()}_MERCHANT_ID" in str(raised.value)
    assert len(sim.refused) == 1


@pytest.mark.parametrize("which", ["cryptosteroid", "cryptopos"])
@pytest.mark.parametrize("fault", ["500", "garbage", "truncated", "hang", "bad_invoice", "429"])
async def test_failures_are_retried_within_the_bound(
    serve: Serve,
    cryptosteroid_sim: CryptoSteroidSimulator,
    cryptopos_sim: CryptoPosSimulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
    which: str,
    fault: str,
) -> None:
    sim: Simulator = cryptosteroid_sim if which == "cryptosteroid" else cryptopos_sim
    api, invoice_id = await started(serve, sim, clock, http)
    sim.faults.extend([fault] * (FAST_POLICY.attempts - 1))  # type: ignore[list-item]
    event = await api.fetch(invoice_id, RECEIVED)
    assert event.invoice_id == invoice_id
    assert len(sim.requests) == FAST_POLICY.attempts

    sim.faults.extend([fault] * FAST_POLICY.attempts)  # type: ignore[list-item]
    with pytest.raises(ApiError) as raised:
        await api.fetch(invoice_id, RECEIVED)
    assert raised.value.retryable
    assert len(sim.requests) == 2 * FAST_POLICY.attempts
    assert CS_KEY not in str(raised.value)
    assert POS_KEY not in str(raised.value)


async def test_an_unknown_invoice_is_an_error_for_that_invoice_only(
    serve: Serve,
    cryptopos_sim: CryptoPosSimulator,
    clock: ManualClock,
    http: aiohttp.ClientSession,
) -> None:
    api, _ = await started(serve, cryptopos_sim, clock, http)
    with pytest.raises(InvoiceUnavailable):
        await api.fetch("pos-9999", RECEIVED)
    assert cryptopos_sim.requests == ["pos-9999"]


async def test_an_unreachable_api_is_unavailable(
    clock: ManualClock, http: aiohttp.ClientSession, unreachable: str
) -> None:
    api = StatusApi(
        http,
        cryptosteroid.status_endpoint(f"http://{unreachable}", Secret(b"k"), CS_MERCHANT),
        clock=clock,
        policy=FAST_POLICY,
    )
    with pytest.raises(Unavailable, match="connection failed"):
        await api.fetch("cs-0001", RECEIVED)
