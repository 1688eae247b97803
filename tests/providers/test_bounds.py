"""Hostile provider payloads that once passed or crashed: text no store can hold, times outside
1970 .. 9999 UTC or far ahead, integers beyond 64 bits, a payment listed twice. Pure, plus a
few through the ingest app (a 400 naming the field, never a 500)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from schemas.events import InvoiceEvent
from service.errors import InvalidJson, InvalidPayload
from service.ingest.app import SETTINGS
from service.providers.bitfinex import BITFINEX
from service.providers.cryptopos import CRYPTOPOS
from service.providers.cryptopos import split as split_cryptopos
from service.providers.cryptosteroid import CRYPTOSTEROID
from tests.fixtures_app import bitfinex, cryptopos_body, cryptopos_data, cryptosteroid, token_for

NOW = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
NUL = "nul\u0000inv"
INT64_MAX = 2**63 - 1


def dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()  # any integer, \u0000 escaped


def bfx(body: dict[str, Any], at: datetime = NOW) -> InvoiceEvent:
    return BITFINEX.normalize(BITFINEX.decode(dump(body)), at)


def cs(body: dict[str, Any], at: datetime = NOW) -> InvoiceEvent:
    return CRYPTOSTEROID.normalize(CRYPTOSTEROID.decode(dump(body)), at)


def pos(data: dict[str, Any], at: datetime = NOW) -> InvoiceEvent:
    _, raw = split_cryptopos(cryptopos_body(data))
    return CRYPTOPOS.normalize(CRYPTOPOS.decode(raw), at)


def bfx_payment(**changes: Any) -> dict[str, Any]:
    body = bitfinex()
    body["payment"].update(changes)
    return body


def cs_payment(**changes: Any) -> dict[str, Any]:
    body = cryptosteroid()
    body["payment"].update(changes)
    return body


def cs_paid(**changes: Any) -> dict[str, Any]:
    body = cryptosteroid()
    body["payment"]["paid"].update(changes)
    return body


def pos_tx(**changes: Any) -> dict[str, Any]:
    data = cryptopos_data()
    data["transactions"][0].update(changes)
    return data


def pos_client(reference: str) -> dict[str, Any]:
    data = cryptopos_data()
    data["client"]["referenceID"] = reference
    return data


# --- 1: text no store can hold ----------------------------------------------------------------

TEXT_FIELDS = [
    (lambda v: bfx(bitfinex(id=v)), "$.id"),
    (lambda v: bfx(bitfinex(orderId=v)), "$.orderId"),
    (lambda v: bfx(bitfinex(currency=v)), "$.currency"),
    (lambda v: bfx(bfx_payment(txid=v)), "$.payment.txid"),
    (lambda v: bfx(bfx_payment(currency=v)), "$.payment.currency"),
    (lambda v: bfx(bfx_payment(method=v)), "$.payment.method"),
    (
        lambda v: bfx(bitfinex(invoices=[{"amount": 1, "currency": "BTC", "payCurrency": v}])),
        "$.invoices[0].payCurrency",
    ),
    (lambda v: cs(cryptosteroid(invoiceId=v)), "$.invoiceId"),
    (lambda v: cs(cryptosteroid(externalId=v)), "$.externalId"),
    (lambda v: cs(cryptosteroid(fiatCurrency=v)), "$.fiatCurrency"),
    (lambda v: cs(cs_payment(method=v)), "$.payment.method"),
    (lambda v: cs(cs_paid(hash=["h1", v])), "$.payment.paid.hash[1]"),
    (lambda v: pos(cryptopos_data(id=v)), "$.data.id"),
    (lambda v: pos(cryptopos_data(currency=v)), "$.data.currency"),
    (lambda v: pos(pos_client(v)), "$.data.client.referenceID"),
    (lambda v: pos(pos_tx(tx=v)), "$.data.transactions[0].tx"),
    (lambda v: pos(pos_tx(network=v)), "$.data.transactions[0].network"),
]


@pytest.mark.parametrize(("make", "path"), TEXT_FIELDS)
def test_a_nul_in_any_text_that_reaches_the_event_is_refused_naming_it(
    make: Any, path: str
) -> None:
    make("fine")  # the same body with ordinary text is accepted
    with pytest.raises(InvalidPayload) as caught:
        make(NUL)
    assert f"`{path}`" in caught.value.detail


def test_a_lone_surrogate_never_decodes() -> None:
    body = dump(bitfinex(id="X")).replace(b'"id": "X"', b'"id": "\\ud800"')
    assert b"ud800" in body
    with pytest.raises(InvalidJson, match="surrogate"):
        BITFINEX.decode(body)


# --- 4: times and integers --------------------------------------------------------------------

OUT_OF_RANGE_TIMES = [
    "0001-01-01T00:00:00+01:00",  # year 0 once in UTC
    "9999-12-31T23:59:59-01:00",  # year 10000 once in UTC
    "1969-12-31T23:59:59Z",
    "2024-10-02T12:00:01Z",  # more than 24 h after NOW
]

TIME_FIELDS = [
    (lambda v: bfx(bfx_payment(created_at=v, updated_at=v)), "$.payment.created_at"),
    (lambda v: bfx(bfx_payment(updated_at=v)), "$.payment.updated_at"),
    (lambda v: cs(cryptosteroid(updatedAt=v)), "$.updatedAt"),
    (lambda v: cs(cryptosteroid(createdAt=v)), "$.createdAt"),
    (lambda v: pos(pos_tx(timestamp=v)), "$.data.transactions[0].timestamp"),
    (lambda v: pos(cryptopos_data(createdAt=v)), "$.data.createdAt"),
]


@pytest.mark.parametrize(("make", "path"), TIME_FIELDS)
@pytest.mark.parametrize("when", OUT_OF_RANGE_TIMES)
def test_a_time_outside_1970_to_9999_or_a_day_ahead_is_refused_naming_it(
    make: Any, path: str, when: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        make(when)
    assert f"`{path}`" in caught.value.detail


@pytest.mark.parametrize(("make", "path"), TIME_FIELDS)
def test_times_at_the_bounds_are_accepted(make: Any, path: str) -> None:
    make("2024-10-02T12:00:00Z")  # exactly 24 h ahead
    make("2024-10-02T13:00:00+01:00")
    make("1970-01-01T00:00:00Z")


@pytest.mark.parametrize(
    "t",
    [-1, -(2**63), INT64_MAX, int((NOW + timedelta(hours=24, milliseconds=1)).timestamp() * 1000)],
)
def test_bitfinex_t_outside_the_range_is_refused(t: int) -> None:
    with pytest.raises(InvalidPayload, match=r"`\$\.t`"):
        bfx(bitfinex(t=t))


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda v: bfx(bitfinex(t=v)), "$.t"),
        (lambda v: bfx(bfx_payment(confirmations=v)), "$.payment.confirmations"),
        (lambda v: bfx(bfx_payment(depositId=v)), "$.payment.depositId"),
        (lambda v: bfx(bfx_payment(ledgerId=v)), "$.payment.ledgerId"),
    ],
)
@pytest.mark.parametrize("big", [2**64, 2**63, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_are_refused_naming_the_field(
    make: Any, path: str, big: int
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        make(big)
    assert f"`{path}`" in caught.value.detail


def test_64_bit_confirmations_are_accepted() -> None:
    (payment,) = bfx(bfx_payment(confirmations=INT64_MAX)).payments
    assert payment.confirmations == INT64_MAX


# --- 6: a payment listed twice ---------------------------------------------------------------


def test_payment_repeated_in_additional_payments_is_listed_once_with_the_same_id() -> None:
    alone = bfx(bitfinex())
    body = bitfinex()
    body["additionalPayments"] = [dict(body["payment"])]
    inside = bitfinex()
    inside["payment"]["additionalPayments"] = [dict(inside["payment"])]
    for repeated in (bfx(body), bfx(inside)):
        assert repeated.payments == alone.payments
        assert repeated.event_id == alone.event_id


def test_a_repeated_payment_keeps_its_most_confirmed_copy_where_it_first_stood() -> None:
    body = bitfinex()
    later = dict(body["payment"], confirmations=9, updated_at="2021-01-06 21:30:00")
    other = dict(body["payment"], txid="tx-other", amount=0.00000001)
    body["additionalPayments"] = [other, later]
    event = bfx(body)
    assert [p.txid for p in event.payments] == [body["payment"]["txid"], "tx-other"]
    assert event.payments[0].confirmations == 9
    # A same txid in another currency is another payment.
    body["additionalPayments"] = [dict(body["payment"], currency="LNX")]
    assert len(bfx(body).payments) == 2


def test_cryptosteroid_hash_and_cryptopos_transaction_listed_twice_count_once() -> None:
    assert [p.txid for p in cs(cs_paid(hash=["h1", "h2", "h1"])).payments] == ["h1", "h2"]
    data = cryptopos_data()
    data["transactions"].append(dict(data["transactions"][0]))
    assert len(pos(data).payments) == 1


# --- through the app: 400 naming the field, never a 500 ---------------------------------------

Client = TestClient[Any, Any]
BFX = "/v1/webhooks/bitfinex/order123"


async def post_bitfinex(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    assert client.app is not None
    token = token_for(client.app[SETTINGS], "bitfinex", "order123")
    response = await client.post(
        BFX,
        data=dump(body),
        params={"token": token},
        headers={"Content-Type": "application/json"},
    )
    answer: dict[str, Any] = await response.json()
    return response.status, answer


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (bitfinex(id=NUL), "$.id"),
        (bfx_payment(created_at="0001-01-01T00:00:00+01:00"), "$.payment.created_at"),
        (bfx_payment(updated_at="9999-12-31T23:59:59-01:00"), "$.payment.updated_at"),
        (bfx_payment(confirmations=2**64), "$.payment.confirmations"),
        (bitfinex(amount="\u0661\u0662\u0663"), "$.amount"),
        (bitfinex(amount=-1), "$.amount"),
        (bitfinex(amount="9.99E+79"), "$.amount"),
    ],
)
async def test_the_app_answers_400_invalid_payload_naming_the_field(
    offline_client: Client, body: dict[str, Any], path: str
) -> None:
    status, answer = await post_bitfinex(offline_client, body)
    assert (status, answer["error"]) == (400, "invalid_payload"), answer
    assert f"`{path}`" in answer["detail"]
