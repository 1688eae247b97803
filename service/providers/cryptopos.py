"""Crypto POS: its callback authenticated, decoded and normalized; its status read back.

Authentication is by the merchant: one callback URL per merchant, and every callback signs its
``data`` with the merchant secret (``PAYHOOK_CRYPTOPOS_SECRET``) inside the body, so the
envelope is split (not decoded) first and the signature checked on the exact bytes of ``data``.
Its payments state a running total (``paidAmount``).

Recovery (``payhook recover``) re-reads an invoice from ``GET {url}/crypto/v1/status/{id}``,
headers ``apikey`` and ``merchantid``; the answer is ``{"success": true, "data": {...}}`` with
``data`` the object the callbacks carry (seed 002), decoded and normalized by the callback's own
code. ``success: false`` is an error for that invoice.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal, final

import msgspec

from schemas.events import InvoiceEvent, Origin, Payment
from schemas.providers import CryptoPosInvoice, CryptoPosTransaction
from service.errors import InvalidJson, InvalidPayload
from service.providers.api import (
    InvoiceUnavailable,
    StatusEndpoint,
    Undecodable,
)
from service.providers.normalize import (
    EPOCH,
    TOO_DEEP,
    amount,
    decode_with,
    distinct,
    finish,
    latest_time,
    parse_time,
    required_amount,
)
from service.providers.samples import NoSample, SampleStatus, iso_millis, sample_json
from service.settings import Secret, Settings


class _CryptoPosEnvelope(msgspec.Struct):
    """The callback as far as it is read before the signature is checked: both fields raw, so
    a missing or odd signature is an authentication failure, not a payload error."""

    signature: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_DATA: Final = msgspec.json.Decoder(CryptoPosInvoice)
_ENVELOPE: Final = msgspec.json.Decoder(_CryptoPosEnvelope)
_STR: Final = msgspec.json.Decoder(str)


def signature(data_bytes: bytes, secret: bytes) -> str:
    """Hex SHA-256 of the exact bytes of ``data`` followed by the merchant secret."""
    return hashlib.sha256(data_bytes + secret).hexdigest()


def verify_signature(data_bytes: bytes, secret: bytes, presented: str) -> bool:
    """Case-insensitive hex comparison, in constant time."""
    expected = signature(data_bytes, secret).encode()
    return hmac.compare_digest(expected, presented.lower().encode("utf-8", "replace"))


def split(body: bytes) -> tuple[str | None, bytes]:
    """The presented signature (None when missing or not a string) and the exact bytes of
    ``data`` (empty when missing). Only a body that is not JSON raises (InvalidJson)."""
    try:
        envelope = _ENVELOPE.decode(body)
    except msgspec.ValidationError:
        # JSON, but not an object: nothing carries a signature.
        return None, b""
    except msgspec.DecodeError as exc:
        raise InvalidJson(str(exc)) from None
    except RecursionError:
        raise InvalidJson(TOO_DEEP) from None
    signature: str | None = None
    if envelope.signature:
        try:
            signature = _STR.decode(envelope.signature)
        except msgspec.ValidationError:
            signature = None
        except msgspec.DecodeError:
            # The raw envelope is not checked for UTF-8 (``"\xff"``): a body that is not
            # UTF-8 JSON, whatever its signature.
            raise InvalidJson("the body is not valid UTF-8 JSON") from None
    return signature, bytes(envelope.data)


def _cryptopos_payment(
    tx: CryptoPosTransaction, default_currency: str | None, path: str, until: datetime
) -> Payment:
    currency = tx.currency or default_currency
    if currency is None:
        raise InvalidPayload(f"Object missing required field `currency` - at `{path}`")
    return Payment(
        txid=tx.tx,
        amount=amount(tx.amount, path, ".amount"),
        currency=currency,
        method=tx.network,
        created_at=parse_time(tx.timestamp, until, path, ".timestamp") if tx.timestamp else None,
        crypto_amount=amount(tx.cryptoAmount, path, ".cryptoAmount"),
    )


def _draft(data: CryptoPosInvoice, until: datetime) -> InvoiceEvent:
    payments = tuple(
        _cryptopos_payment(tx, data.currency, f"$.data.transactions[{i}]", until)
        for i, tx in enumerate(data.transactions)
    )
    if len(payments) > 1:
        payments = distinct(payments)
    amount(data.subTotal, "$.data.subTotal")  # not published, checked all the same
    created = parse_time(data.createdAt, until, "$.data.createdAt")
    stamps = [p.created_at for p in payments if p.created_at is not None]
    occurred = max(stamps) if stamps else created
    total = required_amount(data.total, "$.data.total")
    return InvoiceEvent(
        event_id="",
        received_at=EPOCH,
        provider="cryptopos",
        invoice_id=data.id,
        order_id=data.client.referenceID if data.client else None,
        status="completed" if data.completed else "pending",
        provider_status="completed" if data.completed else "partial",
        amount=total,
        currency="USD",
        pay_currency="USD",
        expected_pay_amount=total,
        payments=payments,
        amount_diff=None,
        paid_total=required_amount(data.paidAmount, "$.data.paidAmount"),
        occurred_at=occurred,
    )


@final
class CryptoPos:
    name: Final = "cryptopos"
    title: Final = "Crypto POS"
    authentication: Final[Literal["merchant_signature"]] = "merchant_signature"
    secret_setting: Final = "PAYHOOK_CRYPTOPOS_SECRET"  # noqa: S105 - the variable's name
    reports_running_total: Final = True

    def merchant_secret(self, settings: Settings) -> Secret | None:
        return settings.cryptopos_secret

    def authenticate(self, body: bytes, secret: Secret) -> bytes | None:
        """The exact bytes of the signed ``data``, or None when the signature is missing or
        wrong. Only a body that is not JSON raises (InvalidJson)."""
        presented, data = split(body)
        if not presented or not data or not verify_signature(data, secret.reveal(), presented):
            return None
        return data

    def decode(self, body: bytes) -> CryptoPosInvoice:
        """Decodes the (already authenticated) ``data`` bytes; paths are reported from the body
        root (``$.data.id``)."""
        return decode_with(_DATA, body, "$.data")

    def order_id_of(self, notification: CryptoPosInvoice) -> str | None:
        return notification.client.referenceID if notification.client else None

    def normalize(
        self, notification: CryptoPosInvoice, received_at: datetime, origin: Origin = "webhook"
    ) -> InvoiceEvent:
        return finish(_draft(notification, latest_time(received_at)), received_at, origin)

    def sample(self, status: SampleStatus, invoice_id: str, order_id: str, now: datetime) -> bytes:
        """The ``data`` of a callback as Crypto POS sends it (seed 002's shape): completed, or
        a partial payment. It sends no expiry callback (NoSample)."""
        if status == "expired":
            raise NoSample("Crypto POS sends no callback for an expiry: use completed or partial")
        total = Decimal("10.00")
        paid = total if status == "completed" else Decimal("4.00")
        body: dict[str, Any] = {
            "client": {"referenceID": order_id},
            "paidAmount": paid,
            "subTotal": total,
            "total": total,
            "partialPaymentsEnabled": True,
            "currency": "USDC",
            "completed": status == "completed",
            "description": "payhook send-test",
            "transactions": [
                {
                    "tx": f"{invoice_id}-tx",
                    "amount": paid,
                    "cryptoAmount": paid * 1_000_000,
                    "timestamp": iso_millis(now - timedelta(minutes=1)),
                    "network": "MATIC_POLYGON",
                }
            ],
            "createdAt": iso_millis(now - timedelta(minutes=10)),
            "merchant": {"name": "payhook send-test", "initiator": "payhook send-test"},
            "id": invoice_id,
        }
        return sample_json(body)

    def sign(self, data: bytes, secret: Secret) -> bytes:
        """The callback envelope around ``data``, signed with the merchant secret."""
        mark = signature(data, secret.reveal()).encode()
        return b'{"signature":"' + mark + b'","data":' + data + b"}"


CRYPTOPOS: Final = CryptoPos()


# --- Recovery: the provider's API -------------

PROVIDER: Final = "cryptopos"
SETTINGS: Final = "PAYHOOK_CRYPTOPOS_API_KEY and PAYHOOK_CRYPTOPOS_MERCHANT_ID"


class _Answer(msgspec.Struct):
    success: bool
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_ANSWER: Final = msgspec.json.Decoder(_Answer)


def to_event(body: bytes, invoice_id: str, received_at: datetime) -> InvoiceEvent:
    """``data`` through the callback's decoder and normalization."""
    try:
        answer = _ANSWER.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise Undecodable(PROVIDER, "answer is not {success, data}") from None
    if not answer.success:
        raise InvoiceUnavailable(PROVIDER, "the provider answered success: false")
    data = CRYPTOPOS.decode(bytes(answer.data))
    if data.id != invoice_id:
        raise Undecodable(PROVIDER, "the answer is about another invoice")
    return CRYPTOPOS.normalize(data, received_at, "recovery")


def status_endpoint(url: str, key: Secret, merchant_id: str) -> StatusEndpoint:
    return StatusEndpoint(
        provider=PROVIDER,
        settings=SETTINGS,
        base=f"{url.rstrip('/')}/crypto/v1/status/",
        headers={
            "apikey": key.reveal().decode(),
            "merchantid": merchant_id,
            "Accept": "application/json",
        },
        to_event=to_event,
    )
