"""Provider notifications in, one provider-neutral :class:`InvoiceEvent` out.

Pure: bytes or Structs in, Structs out, no I/O. Decoders are built once. Every failure is an
:class:`errors.InvalidJson` or :class:`errors.InvalidPayload` whose detail names the field path
the way msgspec does (``- at `$.payment.updated_at```).
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

import msgspec
import orjson

from schemas.events import InvoiceEvent, InvoiceStatus, Payment
from schemas.providers import (
    BitfinexInvoiceEntry,
    BitfinexPayment,
    BitfinexWebhook,
    CryptoPosInvoice,
    CryptoPosTransaction,
    CryptoSteroidInvoice,
)
from service.errors import InvalidJson, InvalidPayload

Notification = BitfinexWebhook | CryptoSteroidInvoice | CryptoPosInvoice

BITFINEX_STATUS: Final[dict[str, InvoiceStatus]] = {
    "CREATED": "created",
    "PENDING": "pending",
    "COMPLETED": "completed",
    "EXPIRED": "expired",
}
CRYPTOSTEROID_STATUS: Final[dict[str, InvoiceStatus]] = {
    "NEW": "created",
    "WAITING": "pending",
    "PAID": "completed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Amounts beyond these bounds are not money; refusing them also keeps arithmetic downstream
# from being handed a 10**999999 to expand.
_MAX_DIGITS: Final = 40
_MAX_EXPONENT: Final = 40


class _CryptoPosEnvelope(msgspec.Struct):
    """The callback as far as it is read before the signature is checked: both fields raw, so
    a missing or odd signature is an authentication failure, not a payload error."""

    signature: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_BITFINEX: Final = msgspec.json.Decoder(BitfinexWebhook)
_CRYPTOSTEROID: Final = msgspec.json.Decoder(CryptoSteroidInvoice)
_CRYPTOPOS_DATA: Final = msgspec.json.Decoder(CryptoPosInvoice)
_CRYPTOPOS_ENVELOPE: Final = msgspec.json.Decoder(_CryptoPosEnvelope)
_STR: Final = msgspec.json.Decoder(str)
_ANY: Final = msgspec.json.Decoder()
# msgspec refuses nesting deeper than the interpreter's recursion limit with RecursionError.
_TOO_DEEP: Final = "JSON is nested too deeply"


def _decode_error(
    exc: msgspec.DecodeError, body: bytes, prefix: str = "$"
) -> InvalidJson | InvalidPayload:
    if isinstance(exc, msgspec.ValidationError):
        # The typed decoder stops at the first wrong type, before it would see that the rest
        # is not JSON at all; that is a different answer (invalid_json), so check.
        try:
            _ANY.decode(body)
        except msgspec.DecodeError as syntax:
            return InvalidJson(str(syntax))
        except RecursionError:
            return InvalidJson(_TOO_DEEP)
        message = str(exc)
        if prefix != "$":
            if "- at `$" in message:
                message = message.replace("- at `$", f"- at `{prefix}", 1)
            else:
                message = f"{message} - at `{prefix}`"
        return InvalidPayload(message)
    return InvalidJson(str(exc))


def decode(provider: str, body: bytes) -> BitfinexWebhook | CryptoSteroidInvoice:
    """Decodes a per-order provider's body (Bitfinex, CryptoSteroid)."""
    try:
        if provider == "bitfinex":
            return _BITFINEX.decode(body)
        if provider == "cryptosteroid":
            return _CRYPTOSTEROID.decode(body)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc, body) from None
    except RecursionError:
        raise InvalidJson(_TOO_DEEP) from None
    raise ValueError(f"not a per-order provider: {provider}")


def split_cryptopos(body: bytes) -> tuple[str | None, bytes]:
    """The presented signature (None when missing or not a string) and the exact bytes of
    ``data`` (empty when missing). Only a body that is not JSON raises (InvalidJson)."""
    try:
        envelope = _CRYPTOPOS_ENVELOPE.decode(body)
    except msgspec.ValidationError:
        # JSON, but not an object: nothing carries a signature.
        return None, b""
    except msgspec.DecodeError as exc:
        raise InvalidJson(str(exc)) from None
    except RecursionError:
        raise InvalidJson(_TOO_DEEP) from None
    signature: str | None = None
    if envelope.signature:
        try:
            signature = _STR.decode(envelope.signature)
        except msgspec.ValidationError:
            signature = None
    return signature, bytes(envelope.data)


def decode_cryptopos_data(data: bytes) -> CryptoPosInvoice:
    """Decodes the (already authenticated) ``data`` bytes; paths are reported from the body
    root (``$.data.id``)."""
    try:
        return _CRYPTOPOS_DATA.decode(data)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc, data, "$.data") from None
    except RecursionError:
        raise InvalidJson(_TOO_DEEP) from None


def order_id_of(notification: Notification) -> str | None:
    """The merchant's order id the notification is about, if it states one."""
    match notification:
        case BitfinexWebhook():
            return notification.orderId
        case CryptoSteroidInvoice():
            return notification.externalId
        case CryptoPosInvoice():
            return notification.client.referenceID if notification.client else None


def normalize(notification: Notification, received_at: datetime) -> InvoiceEvent:
    """The provider-neutral event. Raises InvalidPayload for an unknown status, a malformed
    time or an amount that is not a finite decimal of sane size."""
    match notification:
        case BitfinexWebhook():
            draft = _bitfinex(notification)
        case CryptoSteroidInvoice():
            draft = _cryptosteroid(notification)
        case CryptoPosInvoice():
            draft = _cryptopos(notification)
    # The builders leave event_id and received_at blank: the id covers the content only.
    return msgspec.structs.replace(draft, event_id=event_id(draft), received_at=received_at)


def _decimal_fields(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in msgspec.structs.fields(struct)
        if f.type is Decimal or Decimal in typing.get_args(f.type)
    )


_EVENT_DECIMALS: Final = _decimal_fields(InvoiceEvent)
_PAYMENT_DECIMALS: Final = _decimal_fields(Payment)


def event_id(event: InvoiceEvent) -> str:
    """128 bits of SHA-256 over the event's canonical content: keys sorted, decimals without
    trailing zeros (``2.50`` and ``2.5`` agree), times as UTC instants. Neither the raw bytes
    nor ``received_at`` take part, so a repeat, however formatted, has the same id."""
    content = msgspec.structs.asdict(event)
    del content["event_id"], content["received_at"]
    for name in _EVENT_DECIMALS:
        content[name] = _canonical(content[name])
    payments = []
    for payment in event.payments:
        fields = msgspec.structs.asdict(payment)
        for name in _PAYMENT_DECIMALS:
            fields[name] = _canonical(fields[name])
        payments.append(fields)
    content["payments"] = payments
    # orjson refuses a Decimal: a new decimal field cannot slip into the id uncanonicalized.
    canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def _canonical(value: Decimal | None) -> str | None:
    if value is None:
        return None
    # Positional notation is bounded: _amount() admits only modest exponents.
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _path(parts: tuple[object, ...]) -> str:
    return "".join(map(str, parts))


def _amount(value: Decimal | None, *path: object) -> Decimal | None:
    """The amount, when it is a finite decimal of sane size. ``path`` names the field, in
    pieces joined only for an error message: this runs for every amount of every request."""
    if value is None:
        return None
    if not value.is_finite():
        raise InvalidPayload(f"Expected a finite decimal, got `{value}` - at `{_path(path)}`")
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if len(digits) > _MAX_DIGITS or not -_MAX_EXPONENT <= exponent <= _MAX_EXPONENT:
        raise InvalidPayload(f"Decimal out of range - at `{_path(path)}`")
    return value


def _required_amount(value: Decimal, *path: object) -> Decimal:
    _amount(value, *path)
    return value


def _time(text: str, *path: object) -> datetime:
    """An ISO 8601 / RFC 3339 time; one without an offset is UTC (Bitfinex's
    ``YYYY-MM-DD hh:mm:ss`` is UTC). ``path`` as for :func:`_amount`."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidPayload(f"Invalid time {text[:64]!r} - at `{_path(path)}`") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _status(table: dict[str, InvoiceStatus], status: str, path: str) -> InvoiceStatus:
    try:
        return table[status]
    except KeyError:
        known = ", ".join(table)
        raise InvalidPayload(
            f"Unknown status {status[:32]!r}, expected one of {known} - at `{path}`"
        ) from None


def _bitfinex_payments(
    hook: BitfinexWebhook,
) -> Iterable[tuple[str, BitfinexPayment]]:
    if hook.payment is None:
        return
    yield "$.payment", hook.payment
    for i, extra in enumerate(hook.additionalPayments or ()):
        yield f"$.additionalPayments[{i}]", extra
    for i, extra in enumerate(hook.payment.additionalPayments or ()):
        yield f"$.payment.additionalPayments[{i}]", extra


def _bitfinex(hook: BitfinexWebhook) -> InvoiceEvent:
    status = _status(BITFINEX_STATUS, hook.status, "$.status")
    payments: list[Payment] = []
    latest: datetime | None = None
    for path, p in _bitfinex_payments(hook):
        created = _time(p.created_at, path, ".created_at") if p.created_at else None
        if not p.updated_at:
            updated = None
        elif p.updated_at == p.created_at:  # the usual case: parsed once
            updated = created
        else:
            updated = _time(p.updated_at, path, ".updated_at")
        payments.append(
            Payment(
                txid=p.txid,
                amount=_amount(p.amount, path, ".amount"),
                currency=p.currency,
                method=p.method,
                confirmations=p.confirmations,
                created_at=created,
                updated_at=updated,
                force_completed=bool(p.forceCompleted),
            )
        )
        moment = updated or created
        if moment is not None and (latest is None or moment > latest):
            latest = moment
    if latest is None:
        try:
            latest = _EPOCH + timedelta(milliseconds=hook.t)
        except OverflowError:
            raise InvalidPayload("Timestamp out of range - at `$.t`") from None

    entry: BitfinexInvoiceEntry | None = None
    entry_index = 0
    pay_currency: str | None = None
    if hook.payment is not None:
        pay_currency = hook.payment.currency
        for i, candidate in enumerate(hook.invoices):
            if candidate.payCurrency == pay_currency:
                entry, entry_index = candidate, i
                break
        else:
            # A COMPLETED webhook lists only the paid entry.
            if len(hook.invoices) == 1 and status == "completed":
                entry = hook.invoices[0]
    elif len(hook.invoices) == 1:
        entry = hook.invoices[0]
        pay_currency = entry.payCurrency
    return InvoiceEvent(
        event_id="",
        received_at=_EPOCH,
        provider="bitfinex",
        invoice_id=hook.id,
        order_id=hook.orderId,
        status=status,
        provider_status=hook.status,
        amount=_required_amount(hook.amount, "$.amount"),
        currency=hook.currency,
        pay_currency=pay_currency,
        expected_pay_amount=_amount(entry.amount, "$.invoices[", entry_index, "].amount")
        if entry is not None
        else None,
        payments=tuple(payments),
        amount_diff=_amount(hook.payment.amountDiff, "$.payment.amountDiff")
        if hook.payment is not None
        else None,
        paid_total=None,
        occurred_at=latest,
    )


def _cryptosteroid(invoice: CryptoSteroidInvoice) -> InvoiceEvent:
    status = _status(CRYPTOSTEROID_STATUS, invoice.status, "$.status")
    if invoice.updatedAt:
        occurred = _time(invoice.updatedAt, "$.updatedAt")
    else:
        occurred = _time(invoice.createdAt, "$.createdAt")
    pay = invoice.payment
    payments: tuple[Payment, ...] = ()
    paid_total: Decimal | None = None
    if pay is not None and pay.paid is not None:
        paid_total = _amount(pay.paid.received, "$.payment.paid.received")
        # A hash's own amount is not stated; only the running total is.
        payments = tuple(
            Payment(txid=h, amount=None, currency=pay.method, method=pay.method)
            for h in pay.paid.hash
        )
    return InvoiceEvent(
        event_id="",
        received_at=_EPOCH,
        provider="cryptosteroid",
        invoice_id=invoice.invoiceId,
        order_id=invoice.externalId,
        status=status,
        provider_status=invoice.status,
        amount=_required_amount(invoice.fiatAmount, "$.fiatAmount"),
        currency=invoice.fiatCurrency,
        pay_currency=pay.method if pay is not None else None,
        expected_pay_amount=_amount(pay.amount, "$.payment.amount") if pay is not None else None,
        payments=payments,
        amount_diff=None,
        paid_total=paid_total,
        occurred_at=occurred,
    )


def _cryptopos_payment(
    tx: CryptoPosTransaction, default_currency: str | None, path: str
) -> Payment:
    currency = tx.currency or default_currency
    if currency is None:
        raise InvalidPayload(f"Object missing required field `currency` - at `{path}`")
    return Payment(
        txid=tx.tx,
        amount=_amount(tx.amount, path, ".amount"),
        currency=currency,
        method=tx.network,
        created_at=_time(tx.timestamp, path, ".timestamp") if tx.timestamp else None,
        crypto_amount=_amount(tx.cryptoAmount, path, ".cryptoAmount"),
    )


def _cryptopos(data: CryptoPosInvoice) -> InvoiceEvent:
    payments = tuple(
        _cryptopos_payment(tx, data.currency, f"$.data.transactions[{i}]")
        for i, tx in enumerate(data.transactions)
    )
    stamps = [p.created_at for p in payments if p.created_at is not None]
    occurred = max(stamps) if stamps else _time(data.createdAt, "$.data.createdAt")
    return InvoiceEvent(
        event_id="",
        received_at=_EPOCH,
        provider="cryptopos",
        invoice_id=data.id,
        order_id=data.client.referenceID if data.client else None,
        status="completed" if data.completed else "pending",
        provider_status="completed" if data.completed else "partial",
        amount=_required_amount(data.total, "$.data.total"),
        currency="USD",
        pay_currency="USD",
        expected_pay_amount=data.total,
        payments=payments,
        amount_diff=None,
        paid_total=_amount(data.paidAmount, "$.data.paidAmount"),
        occurred_at=occurred,
    )
