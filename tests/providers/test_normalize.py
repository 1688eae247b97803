"""Notifications into InvoiceEvents: statuses, times, currencies, content-derived ids. Pure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import InvoiceEvent
from service.errors import InvalidPayload
from service.providers.bitfinex import BITFINEX
from service.providers.cryptopos import CRYPTOPOS
from service.providers.cryptopos import split as split_cryptopos
from service.providers.cryptosteroid import CRYPTOSTEROID
from tests.fixtures_app import (
    PII,
    SEED_003,
    bitfinex,
    cryptopos_body,
    cryptopos_data,
    cryptosteroid,
    encode,
)

NOW = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)


def bfx(body: dict[str, Any] | bytes, at: datetime = NOW) -> InvoiceEvent:
    raw = body if isinstance(body, bytes) else encode(body)
    return BITFINEX.normalize(BITFINEX.decode(raw), at)


def cs(body: dict[str, Any], at: datetime = NOW) -> InvoiceEvent:
    return CRYPTOSTEROID.normalize(CRYPTOSTEROID.decode(encode(body)), at)


def pos(data: dict[str, Any], at: datetime = NOW) -> InvoiceEvent:
    _, raw = split_cryptopos(cryptopos_body(data))
    return CRYPTOPOS.normalize(CRYPTOPOS.decode(raw), at)


def test_seed_003_event() -> None:
    event = bfx(SEED_003)
    assert event.provider == "bitfinex"
    assert event.invoice_id == "a6761c8b-468f-40ad-a522-cc5e41c39757"
    assert event.order_id == "order123"
    assert (event.status, event.provider_status) == ("completed", "COMPLETED")
    assert (event.amount, event.currency) == (Decimal("2.5"), "USD")
    assert event.pay_currency == "BTC"
    assert str(event.expected_pay_amount) == "0.00006262"
    (payment,) = event.payments
    assert payment.txid.startswith("5119b4ca")
    assert str(payment.amount) == "0.00006262"
    assert (payment.currency, payment.method, payment.confirmations) == ("BTC", "BITCOIN", 6)
    assert payment.created_at == datetime(2021, 1, 6, 21, 16, 28, tzinfo=UTC)
    assert payment.force_completed is False
    assert event.amount_diff is None
    assert event.paid_total is None
    # Bitfinex's 'YYYY-MM-DD hh:mm:ss' is UTC; the latest payment update is the event's time.
    assert event.occurred_at == datetime(2021, 1, 6, 21, 16, 28, tzinfo=UTC)
    assert event.received_at == NOW
    wire = json.loads(msgspec.json.encode(event))
    assert wire["expected_pay_amount"] == "0.00006262"
    assert wire["occurred_at"] == "2021-01-06T21:16:28Z"
    assert wire["schema"] == "payhook.invoice-event.v1"


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ("CREATED", "created"),
        ("PENDING", "pending"),
        ("COMPLETED", "completed"),
        ("EXPIRED", "expired"),
    ],
)
def test_bitfinex_statuses(sent: str, status: str) -> None:
    event = bfx(bitfinex(status=sent))
    assert (event.status, event.provider_status) == (status, sent)


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ("NEW", "created"),
        ("WAITING", "pending"),
        ("PAID", "completed"),
        ("EXPIRED", "expired"),
        ("CANCELLED", "cancelled"),
    ],
)
def test_cryptosteroid_statuses(sent: str, status: str) -> None:
    event = cs(cryptosteroid(status=sent))
    assert (event.status, event.provider_status) == (status, sent)


@pytest.mark.parametrize(
    ("completed", "status", "provider_status"),
    [(True, "completed", "completed"), (False, "pending", "partial")],
)
def test_cryptopos_statuses(completed: bool, status: str, provider_status: str) -> None:
    event = pos(cryptopos_data(completed=completed))
    assert (event.status, event.provider_status) == (status, provider_status)


@pytest.mark.parametrize(
    "make",
    [lambda: bfx(bitfinex(status="REFUNDED")), lambda: cs(cryptosteroid(status="paid"))],
)
def test_unknown_status_is_invalid_payload(make: Any) -> None:
    with pytest.raises(InvalidPayload, match=r"`\$\.status`"):
        make()


def test_bitfinex_expired_without_payment_uses_t_in_milliseconds() -> None:
    body = bitfinex(status="EXPIRED", invoices=[])
    del body["payment"]
    event = bfx(body)
    assert event.occurred_at == datetime(2021, 2, 4, 17, 36, 5, 497000, tzinfo=UTC)
    assert event.payments == ()
    assert event.pay_currency is None
    assert event.expected_pay_amount is None
    assert event.amount_diff is None


def test_bitfinex_before_payment_takes_currency_from_a_single_invoice_entry() -> None:
    body = bitfinex(status="PENDING")
    del body["payment"]
    event = bfx(body)
    assert (event.pay_currency, str(event.expected_pay_amount)) == ("BTC", "0.00006262")

    two = [
        {"amount": 0.0001, "currency": "BTC", "payCurrency": "BTC"},
        {"amount": 2.5, "currency": "USDT", "payCurrency": "UST"},
    ]
    event = bfx({**body, "invoices": two})
    assert (event.pay_currency, event.expected_pay_amount) == (None, None)


def test_bitfinex_payment_picks_the_matching_invoice_entry() -> None:
    two = [
        {"amount": 0.0001, "currency": "BTC", "payCurrency": "BTC"},
        {"amount": "2.50", "currency": "USDT", "payCurrency": "UST"},
    ]
    payment = {**bitfinex()["payment"], "currency": "UST", "amount": "2.5"}
    event = bfx(bitfinex(status="PENDING", invoices=two, payment=payment))
    assert event.pay_currency == "UST"
    assert str(event.expected_pay_amount) == "2.50"


def test_bitfinex_time_is_the_latest_update_across_all_payments() -> None:
    body = bitfinex()
    body["payment"].update(forceCompleted=True, amountDiff="-0.00000262")
    extra = {**body["payment"], "txid": "tx-2", "updated_at": "2021-01-07 08:00:00"}
    nested = {**body["payment"], "txid": "tx-3", "updated_at": "2021-01-07 09:30:00"}
    body["additionalPayments"] = [extra]
    body["payment"]["additionalPayments"] = [nested]
    event = bfx(body)
    assert [p.txid for p in event.payments][1:] == ["tx-2", "tx-3"]
    assert event.occurred_at == datetime(2021, 1, 7, 9, 30, tzinfo=UTC)
    assert event.amount_diff == Decimal("-0.00000262")
    assert event.payments[0].force_completed is True


def test_bitfinex_bad_payment_time_names_its_path() -> None:
    body = bitfinex()
    body["payment"]["updated_at"] = "06/01/2021"
    with pytest.raises(InvalidPayload, match=r"`\$\.payment\.updated_at`"):
        bfx(body)


def test_cryptosteroid_event() -> None:
    event = cs(cryptosteroid())
    assert event.invoice_id == "cs-inv-1"
    assert event.order_id == "order-42"
    assert (str(event.amount), event.currency) == ("100.00", "USD")
    assert (event.pay_currency, str(event.expected_pay_amount)) == ("USDT_TRC20", "100.50")
    assert str(event.paid_total) == "60.25"
    assert [(p.txid, p.amount, p.currency) for p in event.payments] == [
        ("h1", None, "USDT_TRC20"),
        ("h2", None, "USDT_TRC20"),
    ]
    assert event.occurred_at == datetime(2024, 5, 1, 10, 5, tzinfo=UTC)


def test_cryptosteroid_time_falls_back_to_created_at_and_payment_may_be_absent() -> None:
    event = cs(cryptosteroid(updatedAt=None, payment=None, status="NEW"))
    assert event.occurred_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert (event.pay_currency, event.expected_pay_amount, event.paid_total) == (None,) * 3
    assert event.payments == ()


def test_cryptopos_event() -> None:
    event = pos(cryptopos_data())
    assert event.invoice_id == "66da1bc34f03a871430c1a71"
    assert event.order_id == "123test"
    assert (event.amount, event.currency) == (Decimal("0.1"), "USD")
    assert (event.pay_currency, event.expected_pay_amount) == ("USD", Decimal("0.1"))
    assert event.paid_total == Decimal("0.1")
    (payment,) = event.payments
    assert str(payment.amount) == "0.09999999999999999"
    assert payment.crypto_amount == Decimal(100000)
    assert payment.currency == "USDC"  # the transaction sent none: data.currency
    assert payment.method == "MATIC_POLYGON"
    assert event.occurred_at == datetime(2024, 9, 5, 21, 0, 27, tzinfo=UTC)
    wire = msgspec.json.encode(event).decode()
    for value in PII:
        assert value not in wire


def test_cryptopos_transaction_currency_and_latest_timestamp() -> None:
    txs = [
        {"tx": "a", "amount": 1, "currency": "ETH", "timestamp": "2024-09-05T21:10:00Z"},
        {"tx": "b", "amount": 2, "timestamp": "2024-09-05T21:05:00.000Z"},
    ]
    event = pos(cryptopos_data(transactions=txs, completed=False))
    assert [p.currency for p in event.payments] == ["ETH", "USDC"]
    assert event.occurred_at == datetime(2024, 9, 5, 21, 10, tzinfo=UTC)
    event = pos(cryptopos_data(transactions=[]))
    assert event.occurred_at == datetime(2024, 9, 5, 20, 59, 47, 429000, tzinfo=UTC)


def test_cryptopos_without_client_has_no_order_id() -> None:
    data = cryptopos_data()
    del data["client"]
    assert pos(data).order_id is None


def test_order_id_of_each_provider() -> None:
    assert BITFINEX.order_id_of(BITFINEX.decode(SEED_003)) == "order123"
    assert CRYPTOSTEROID.order_id_of(CRYPTOSTEROID.decode(encode(cryptosteroid()))) == "order-42"
    body = encode(cryptosteroid(externalId=None))
    assert CRYPTOSTEROID.order_id_of(CRYPTOSTEROID.decode(body)) is None


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999999999", "1" * 61])
def test_amounts_must_be_finite_and_sane(bad: str) -> None:
    with pytest.raises(InvalidPayload, match=r"`\$\.fiatAmount`"):
        cs(cryptosteroid(fiatAmount=bad))


def test_event_id_ignores_formatting_and_arrival_time() -> None:
    first = bfx(SEED_003)
    reformatted = json.dumps(dict(reversed(list(json.loads(SEED_003).items()))), indent=3)
    again = bfx(reformatted.encode(), at=NOW + timedelta(hours=5))
    assert again.event_id == first.event_id
    # Numbers written differently but equal are the same content.
    body = json.loads(SEED_003)
    text = json.dumps(body).replace('"amount": 2.5', '"amount": 2.50')
    assert '"amount": 2.50' in text
    assert bfx(text.encode()).event_id == first.event_id
    # Times written differently but equal are the same content.
    assert (
        pos(cryptopos_data()).event_id
        == pos(cryptopos_data(createdAt="2024-09-05T22:59:47.429+02:00")).event_id
    )


def test_event_id_changes_with_content() -> None:
    base = bfx(bitfinex())
    payment = {**bitfinex()["payment"], "confirmations": 7}
    assert bfx(bitfinex(payment=payment)).event_id != base.event_id
    assert bfx(bitfinex(status="EXPIRED")).event_id != base.event_id
    assert bfx(bitfinex(amount="2.51")).event_id != base.event_id
    assert bfx(bitfinex(orderId="order124")).event_id != base.event_id


@given(
    indent=st.none() | st.integers(min_value=0, max_value=4),
    shuffle=st.randoms(use_true_random=False),
    hours=st.integers(min_value=0, max_value=10_000),
)
def test_event_id_is_stable_under_any_key_order_and_spacing(
    indent: int | None, shuffle: Any, hours: int
) -> None:
    body = bitfinex()
    items = list(body.items())
    shuffle.shuffle(items)
    raw = json.dumps(dict(items), indent=indent).encode()
    event = bfx(raw, at=NOW + timedelta(hours=hours))
    assert event.event_id == bfx(SEED_003).event_id
