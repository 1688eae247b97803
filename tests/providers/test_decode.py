"""Provider bodies into their Structs: exact decimals, every documented field, clear errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from schemas.providers import BitfinexWebhook, CryptoSteroidInvoice
from service.errors import InvalidJson, InvalidPayload
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

AT = datetime(2024, 10, 1, tzinfo=UTC)


def text(raw: msgspec.Raw) -> str:
    """An amount as it arrived: normalization reads and checks it (tests/providers/
    test_amounts.py)."""
    return bytes(raw).decode()


def test_seed_003_example_decodes_with_exact_decimals() -> None:
    hook = BITFINEX.decode(SEED_003)
    assert isinstance(hook, BitfinexWebhook)
    assert hook.id == "a6761c8b-468f-40ad-a522-cc5e41c39757"
    assert hook.orderId == "order123"
    assert hook.type == "ECOMMERCE"
    assert hook.t == 1612460165497
    assert text(hook.amount) == "2.5"
    (entry,) = hook.invoices
    assert text(entry.amount) == "0.00006262"
    assert entry.payCurrency == "BTC"
    assert entry.poolCurrency == "BTC"
    assert hook.payment is not None
    assert text(hook.payment.amount) == "0.00006262"
    assert hook.payment.confirmations == 6
    assert hook.payment.depositId == 1357996
    assert hook.payment.created_at == "2021-01-06 21:16:28"
    assert hook.payment.forceCompleted is None
    assert text(hook.payment.amountDiff) == ""  # absent


def test_bitfinex_optional_fields_lightning_ext_and_additional_payments() -> None:
    extra = {
        "txid": "tx-2",
        "amount": 0.00001,
        "currency": "BTC",
        "method": "LNX",
        "status": "COMPLETED",
        "confirmations": 1,
        "created_at": "2021-01-06 21:20:00",
        "updated_at": "2021-01-06 21:20:05",
        "ledgerId": 42,
    }
    body = bitfinex(
        invoices=[
            {
                "amount": 0.00007,
                "currency": "BTC",
                "payCurrency": "LNX",
                "poolCurrency": "BTC",
                "address": "lnbc1...",
                "ext": {"hash": "h", "payment_request": "lnbc1pr", "node_pub": "02ab"},
            }
        ],
        additionalPayments=[extra],
    )
    body["payment"].update(forceCompleted=True, amountDiff="-0.00000738")
    body["payment"]["additionalPayments"] = [extra]
    hook = BITFINEX.decode(encode(body))
    assert isinstance(hook, BitfinexWebhook)
    ext = hook.invoices[0].ext
    assert ext is not None
    assert (ext.hash, ext.payment_request, ext.node_pub) == ("h", "lnbc1pr", "02ab")
    assert hook.payment is not None
    assert hook.payment.forceCompleted is True
    assert text(hook.payment.amountDiff) == '"-0.00000738"'
    assert hook.additionalPayments is not None
    assert hook.additionalPayments[0].ledgerId == 42
    assert text(hook.additionalPayments[0].amount) == "1e-05"  # as json.dumps wrote it
    assert hook.payment.additionalPayments is not None


def test_bitfinex_customer_info_is_not_decoded() -> None:
    hook = BITFINEX.decode(encode(bitfinex()))
    written = msgspec.json.encode(hook).decode()
    for value in PII:
        assert value not in written


def test_cryptosteroid_invoice_decodes_strings_to_decimals() -> None:
    invoice = CRYPTOSTEROID.decode(encode(cryptosteroid()))
    assert isinstance(invoice, CryptoSteroidInvoice)
    assert text(invoice.fiatAmount) == '"100.00"'
    assert invoice.externalId == "order-42"
    assert invoice.payment is not None
    assert text(invoice.payment.net) == '"100.00"'
    assert invoice.payment.paid is not None
    assert invoice.payment.paid.hash == ["h1", "h2"]
    assert text(invoice.payment.paid.received) == '"60.25"'


def test_cryptosteroid_without_payment_or_external_id() -> None:
    invoice = CRYPTOSTEROID.decode(encode(cryptosteroid(payment=None, externalId=None)))
    assert isinstance(invoice, CryptoSteroidInvoice)
    assert invoice.payment is None
    assert invoice.externalId is None


def test_cryptopos_split_gives_exact_data_bytes() -> None:
    body = cryptopos_body(indent=4)
    signature, data = split_cryptopos(body)
    assert signature is not None
    assert data == json.dumps(cryptopos_data(), indent=4).encode()
    invoice = CRYPTOPOS.decode(data)
    assert invoice.id == "66da1bc34f03a871430c1a71"
    assert text(invoice.transactions[0].amount) == "0.09999999999999999"
    assert text(invoice.transactions[0].cryptoAmount) == "100000"
    assert invoice.client is not None
    assert invoice.client.referenceID == "123test"
    written = msgspec.json.encode(invoice).decode()
    for value in PII:
        assert value not in written


@pytest.mark.parametrize(
    ("body", "signature", "has_data"),
    [
        (b'{"data": {}}', None, True),
        (b'{"signature": 12, "data": {}}', None, True),
        (b'{"signature": "ab"}', "ab", False),
        (b"[1, 2]", None, False),
        (b'"just a string"', None, False),
    ],
)
def test_cryptopos_split_tolerates_missing_parts(
    body: bytes, signature: str | None, has_data: bool
) -> None:
    got_signature, data = split_cryptopos(body)
    assert got_signature == signature
    assert bool(data) == has_data


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"signature": "a",}', b"{} {}"])
def test_cryptopos_split_refuses_non_json(body: bytes) -> None:
    with pytest.raises(InvalidJson):
        split_cryptopos(body)


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b'{"id": 1,}', b"null x"])
def test_malformed_json_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJson, match=r"malformed|truncated|Input data"):
        BITFINEX.decode(body)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"amount": "lots"}, "$.amount"),
        ({"t": "yesterday"}, "$.t"),
        ({"invoices": [{"amount": 1}]}, "$.invoices[0]"),
        (
            {"payment": {"txid": "x", "amount": 1, "currency": "BTC", "confirmations": "six"}},
            "$.payment.confirmations",
        ),
    ],
)
def test_wrong_field_type_is_invalid_payload_naming_the_path(
    change: dict[str, object], path: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        # Amounts are checked by normalization, the rest by the decoder.
        BITFINEX.normalize(BITFINEX.decode(encode(bitfinex(**change))), AT)
    assert f"`{path}`" in caught.value.detail


def test_missing_field_is_invalid_payload_naming_it() -> None:
    body = bitfinex()
    del body["status"]
    with pytest.raises(InvalidPayload, match="status"):
        BITFINEX.decode(encode(body))


def test_cryptopos_data_errors_are_reported_from_the_body_root() -> None:
    with pytest.raises(InvalidPayload) as caught:
        CRYPTOPOS.normalize(CRYPTOPOS.decode(json.dumps(cryptopos_data(total="x")).encode()), AT)
    assert "`$.data.total`" in caught.value.detail
    with pytest.raises(InvalidPayload) as caught:
        CRYPTOPOS.decode(b"[]")
    assert "`$.data`" in caught.value.detail


@pytest.mark.parametrize(
    "body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000]
)
def test_deep_nesting_is_invalid_json_not_a_crash(body: bytes) -> None:
    with pytest.raises(InvalidJson, match="nested too deeply"):
        BITFINEX.decode(body)
    with pytest.raises(InvalidJson, match="nested too deeply"):
        split_cryptopos(b'{"signature": "ab", "data": ' + body + b"}")
    with pytest.raises(InvalidJson, match="nested too deeply"):
        CRYPTOPOS.decode(body)


@pytest.mark.parametrize("amount", [b'"1\xff"', b'"\xed\xa0\x80"', b'"1\\u0031\xff"'])
def test_invalid_utf8_inside_a_string_amount_is_invalid_json_not_a_crash(amount: bytes) -> None:
    """Found by `make fuzz`: an amount is read from its raw JSON text, which msgspec has not
    checked for UTF-8 (UnicodeDecodeError, a 500)."""
    body = encode(bitfinex(amount="@amount@")).replace(b'"@amount@"', amount)
    with pytest.raises(InvalidJson, match="UTF-8"):
        BITFINEX.normalize(BITFINEX.decode(body), AT)
