"""schemas.amounts: the PlainEncoder's fast path against the exact path it stands in for."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from schemas.amounts import PlainEncoder, plain
from schemas.events import InvoiceEvent, Payment
from service.consume.reconcile import apply

AT = datetime(2024, 10, 1, tzinfo=UTC)
ENCODER = PlainEncoder()


def event(amount: Decimal, invoice_id: str = "inv-1", txid: str = "tx-1") -> InvoiceEvent:
    return InvoiceEvent(
        event_id="e1",
        provider="bitfinex",
        invoice_id=invoice_id,
        order_id="o1",
        status="completed",
        provider_status="COMPLETED",
        amount=Decimal("2.50"),
        currency="USD",
        pay_currency="BTC",
        expected_pay_amount=Decimal("0.00006262"),
        payments=(Payment(txid=txid, amount=amount, currency="BTC", created_at=AT),),
        occurred_at=AT,
        received_at=AT,
    )


def _sane(value: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and -60 <= exponent <= 60


decimals = st.decimals(allow_nan=False, allow_infinity=False).filter(_sane)
texts = st.text(alphabet="0123456789.E+-abc", max_size=12)


@given(amount=decimals, invoice_id=texts, txid=texts)
def test_the_fast_path_writes_what_the_exact_path_writes(
    amount: Decimal, invoice_id: str, txid: str
) -> None:
    value = event(amount, invoice_id or "x", txid or "y")
    assert ENCODER.encode(value) == ENCODER.encode_exact(value)
    written = msgspec.json.decode(ENCODER.encode(value))["payments"][0]["amount"]
    assert "E" not in written
    assert Decimal(written) == amount
    assert written == plain(amount)


def test_without_a_scientific_decimal_the_bytes_are_msgspecs_own() -> None:
    # An id that looks like an exponent costs the slow path, never a different answer.
    for value in (event(Decimal("0.5")), event(Decimal("0.5"), invoice_id="1E+5", txid="2E-3")):
        assert ENCODER.encode(value) == msgspec.json.encode(value)


def test_settlements_and_stored_states_are_plain_too() -> None:
    state = apply(None, event(Decimal("1E-8")), AT).state
    assert b'"0.00000001"' in ENCODER.encode(state)
    assert b"E-8" not in ENCODER.encode(state)
    assert msgspec.json.decode(ENCODER.encode(state.settlement))["paid_amount"] == "0.00000001"
