"""Provider amounts: ASCII decimal syntax, bounds and sign on the way in, plain notation on the
way out (DESIGN.md, Events). Pure: normalization and the published encoding, no Kafka."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from schemas.amounts import PROVIDER_DECIMAL, PlainEncoder
from schemas.events import InvoiceEvent
from service.consume.reconcile import apply
from service.errors import InvalidPayload
from service.kafka import encode_event
from service.providers.bitfinex import BITFINEX
from service.providers.cryptopos import CRYPTOPOS
from service.providers.cryptopos import split as split_cryptopos
from service.providers.cryptosteroid import CRYPTOSTEROID
from service.providers.normalize import within_bounds
from tests.fixtures_app import SEED_003, bitfinex, cryptopos_body, cryptopos_data, cryptosteroid

NOW = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
PLAIN = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# The amounts of SEED_003 as sent: the invoice's, its entry's and its payment's.
SEED_PAYMENT = b'"amount": 0.00006262, "currency": "BTC", "method"'
SEED_ENTRY = b'{ "amount": 0.00006262, "currency": "BTC", "payCurrency"'


def published(event: InvoiceEvent) -> dict[str, Any]:
    """The event as it goes onto the topic, read back as JSON text values."""
    value: dict[str, Any] = orjson.loads(encode_event(event))
    return value


def bfx_raw(body: bytes) -> InvoiceEvent:
    return BITFINEX.normalize(BITFINEX.decode(body), NOW)


def bfx(**overrides: Any) -> InvoiceEvent:
    return bfx_raw(orjson.dumps(bitfinex(**overrides)))


def with_payment_amount(text: str) -> bytes:
    """SEED_003 with the payment's and the invoice entry's amount written as ``text`` (raw
    JSON: a number, or a quoted string)."""
    body = SEED_003.replace(
        SEED_PAYMENT, b'"amount": ' + text.encode() + b', "currency": "BTC", "method"'
    )
    return body.replace(
        SEED_ENTRY, b'{ "amount": ' + text.encode() + b', "currency": "BTC", "payCurrency"'
    )


def cs(**overrides: Any) -> InvoiceEvent:
    return CRYPTOSTEROID.normalize(
        CRYPTOSTEROID.decode(orjson.dumps(cryptosteroid(**overrides))), NOW
    )


def cs_payment(**changes: Any) -> InvoiceEvent:
    body = cryptosteroid()
    body["payment"].update(changes)
    return CRYPTOSTEROID.normalize(CRYPTOSTEROID.decode(orjson.dumps(body)), NOW)


def cs_received(received: Any) -> InvoiceEvent:
    body = cryptosteroid()
    body["payment"]["paid"]["received"] = received
    return CRYPTOSTEROID.normalize(CRYPTOSTEROID.decode(orjson.dumps(body)), NOW)


def pos(**overrides: Any) -> InvoiceEvent:
    _, raw = split_cryptopos(cryptopos_body(cryptopos_data(**overrides)))
    return CRYPTOPOS.normalize(CRYPTOPOS.decode(raw), NOW)


def pos_tx(**changes: Any) -> InvoiceEvent:
    data = cryptopos_data()
    data["transactions"][0].update(changes)
    _, raw = split_cryptopos(cryptopos_body(data))
    return CRYPTOPOS.normalize(CRYPTOPOS.decode(raw), NOW)


# --- plain notation out --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "written"),
    [
        ("0.00000001", "0.00000001"),  # one satoshi, not "1E-8"
        ("0.000000010", "0.000000010"),  # digits kept, not "1.0E-8"
        ("1e2", "100"),  # not "1E+2"
        ("1E-8", "0.00000001"),
        ("2.50", "2.50"),
        ("0", "0"),
        ('"0.00000001"', "0.00000001"),
        ('"1e2"', "100"),
        ('"0E+5"', "0"),  # not "0E+5"
        ('"2.50E-7"', "0.000000250"),
    ],
)
def test_amounts_are_published_in_plain_notation(sent: str, written: str) -> None:
    value = published(bfx_raw(with_payment_amount(sent)))
    assert value["payments"][0]["amount"] == written
    assert value["expected_pay_amount"] == written


def test_a_computed_difference_is_written_in_plain_notation() -> None:
    # One satoshi short: the difference is -1E-8 as a Decimal.
    event = bfx_raw(
        SEED_003.replace(SEED_PAYMENT, b'"amount": 0.00006261, "currency": "BTC", "method"')
    )
    settlement = apply(None, event, NOW).state.settlement
    assert settlement.difference == Decimal("-1E-8")
    written = orjson.loads(PlainEncoder().encode(settlement))
    assert (written["difference"], written["state"]) == ("-0.00000001", "underpaid")
    assert written["paid_amount"] == "0.00006261"


# --- what is refused on the way in ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        '"\u0661\u0662\u0663"',  # Arabic-Indic digits: Decimal() reads 123
        '"\uff11\uff12\uff13"',  # full-width digits
        '"1_000"',
        '" 5 "',
        '"5 "',
        '"+5"',
        '"007"',
        '".5"',
        '"5."',
        '"NaN"',
        '"Infinity"',
        '"0x10"',
        '""',
        "true",
        "{}",
        "[1]",
        "9.99E+79",  # exponent beyond 60
        "1e61",
        '"1e-61"',
        "1" * 61,  # 61 significant digits
        "0." + "0" * 60 + "1",  # exponent -61
        "-1",
        "-0",  # negative zero counts as negative
        "-0.00",
        '"-0.00"',
        '"-0"',
        "-1e-8",
        "null",  # a payment's amount is required
    ],
)
def test_a_payment_amount_that_is_not_a_sane_ascii_decimal_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(InvalidPayload, match=r"`\$\.payment\.amount`"):
        bfx_raw(
            SEED_003.replace(
                SEED_PAYMENT, b'"amount": ' + bad.encode() + b', "currency": "BTC", "method"'
            )
        )


@pytest.mark.parametrize(
    "good",
    ["1" * 60, "1" * 60 + "e0", "1e60", "0." + "0" * 59 + "1", '"1e-60"', "0E-60", '"0.00"'],
)
def test_the_bounds_themselves_are_accepted(good: str) -> None:
    value = published(bfx_raw(with_payment_amount(good)))
    assert PLAIN.fullmatch(value["payments"][0]["amount"])
    assert Decimal(value["payments"][0]["amount"]) == Decimal(
        orjson.loads(good) if good.startswith('"') else good
    )


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda v: bfx(amount=v), "$.amount"),
        (
            lambda v: bfx(invoices=[{"amount": v, "currency": "BTC", "payCurrency": "BTC"}]),
            "$.invoices[0].amount",
        ),
        (lambda v: cs(fiatAmount=v), "$.fiatAmount"),
        (lambda v: cs_payment(amount=v), "$.payment.amount"),
        (lambda v: cs_payment(fee=v), "$.payment.fee"),
        (cs_received, "$.payment.paid.received"),
        (lambda v: pos(total=v), "$.data.total"),
        (lambda v: pos(paidAmount=v), "$.data.paidAmount"),
        (lambda v: pos_tx(amount=v), "$.data.transactions[0].amount"),
        (lambda v: pos_tx(cryptoAmount=v), "$.data.transactions[0].cryptoAmount"),
    ],
)
@pytest.mark.parametrize(
    "bad", [-1, "-0.5", "-0.00", "\u0661\u0662\u0663", "1_000", " 5 ", "9.99E+79"]
)
def test_every_amount_that_is_paid_or_due_is_checked(make: Any, path: str, bad: Any) -> None:
    with pytest.raises(InvalidPayload) as caught:
        make(bad)
    assert f"`{path}`" in caught.value.detail


def test_amount_diff_may_be_negative_and_keeps_its_digits() -> None:
    body = bitfinex()
    body["payment"]["amountDiff"] = "-0.00"
    assert published(bfx_raw(orjson.dumps(body)))["amount_diff"] == "-0.00"
    body["payment"]["amountDiff"] = -1e-8
    assert published(bfx_raw(orjson.dumps(body)))["amount_diff"] == "-0.00000001"
    body["payment"]["amountDiff"] = "-\uff11"
    with pytest.raises(InvalidPayload, match=r"`\$\.payment\.amountDiff`"):
        bfx_raw(orjson.dumps(body))


def test_the_openapi_pattern_is_the_rule_ingest_applies() -> None:
    rule = re.compile(PROVIDER_DECIMAL)
    for good in ("0", "2.50", "1e2", "-1.0E-8"):
        assert rule.fullmatch(good)
        bfx_raw(with_payment_amount(f'"{good.lstrip("-")}"'))
    for bad in ("+5", "007", ".5", "5.", " 5", "\u0661"):
        assert not rule.fullmatch(bad)


# --- the property -------------------------------------------------------------------------

digits = st.text(alphabet="0123456789", min_size=1, max_size=30)
integer_part = st.one_of(
    st.just("0"),
    st.builds(
        lambda d, rest: d + rest,
        st.sampled_from("123456789"),
        st.text(alphabet="0123456789", max_size=29),
    ),
)
plain_amounts = st.builds(
    lambda whole, fraction: whole + ("." + fraction if fraction else ""),
    integer_part,
    st.one_of(st.just(""), digits),
)


@given(text=plain_amounts, quoted=st.booleans())
@example(text="0.000000010", quoted=False)
@example(text="0.00000001", quoted=True)
def test_any_accepted_plain_amount_comes_out_byte_identical(text: str, quoted: bool) -> None:
    sent = f'"{text}"' if quoted else text
    event = bfx_raw(with_payment_amount(sent))
    encoded = encode_event(event)
    assert f'"amount":"{text}"'.encode() in encoded
    assert published(event)["payments"][0]["amount"] == text


@given(
    mantissa=plain_amounts,
    exponent=st.integers(min_value=0, max_value=25),
    letter=st.sampled_from("eE"),
    sign=st.sampled_from(["", "+", "-"]),
    quoted=st.booleans(),
)
@example(mantissa="0", exponent=5, letter="E", sign="+", quoted=True)
@example(mantissa="1", exponent=8, letter="E", sign="-", quoted=False)
@example(mantissa="1.0", exponent=8, letter="E", sign="-", quoted=True)
def test_any_exponent_form_comes_out_as_its_exact_plain_expansion(
    mantissa: str, exponent: int, letter: str, sign: str, quoted: bool
) -> None:
    text = f"{mantissa}{letter}{sign}{exponent}"
    sent = f'"{text}"' if quoted else text
    written = published(bfx_raw(with_payment_amount(sent)))["payments"][0]["amount"]
    assert PLAIN.fullmatch(written), written
    # Exact: the same number, with exactly the fractional digits the exponent form holds.
    assert Decimal(written) == Decimal(text)
    power = -exponent if sign == "-" else exponent
    fraction_digits = len(mantissa.partition(".")[2]) - power
    assert len(written.partition(".")[2]) == max(0, fraction_digits)


@given(
    digits=st.text(alphabet="0123456789", min_size=1, max_size=60),
    point=st.integers(min_value=0, max_value=60),
    exponent=st.integers(min_value=-60, max_value=60),
)
@example(digits="1", point=0, exponent=60)
@example(digits="10", point=0, exponent=60)  # stripped of its zero, 1 with exponent 61
@example(digits="1" * 60, point=0, exponent=60)
@example(digits="1", point=0, exponent=-60)
@example(digits="0", point=0, exponent=-60)
@example(digits="0" * 60, point=30, exponent=-60)
def test_what_ingest_admits_is_within_bounds_as_the_consumer_reads_it_back(
    digits: str, point: int, exponent: int
) -> None:
    """The consumer re-checks the bounds of what another producer wrote (within_bounds); it
    must admit everything ingest admitted, as it reads back from plain notation."""
    mantissa = digits if point == 0 else f"{digits[:-point] or '0'}.{digits[-point:]}"
    sent = f'"{mantissa}e{exponent}"'
    try:
        event = bfx_raw(with_payment_amount(sent))
    except InvalidPayload:
        return  # beyond ingest's own bounds (digits or exponent as sent)
    written = published(event)["payments"][0]["amount"]
    assert within_bounds(Decimal(written)), written


@pytest.mark.parametrize(
    "beyond",
    [
        "1E+999990",
        "1" * 61,
        "0." + "0" * 60 + "1",
        "1E+121",
        "1E-61",
        "0E-61",  # a zero too: "0E-3000000" is three megabytes of zeros in plain notation
        "0E-3000000",
        "1" + "0" * 1000,
        "NaN",
        "Infinity",
    ],
)
def test_what_no_provider_may_send_is_beyond_bounds(beyond: str) -> None:
    assert not within_bounds(Decimal(beyond))
