"""What every provider's normalization shares: decode errors that name the field the way
msgspec does (``- at `$.payment.updated_at```), amount checks, times, status tables and the
content-derived ``event_id``.

Pure: bytes or Structs in, Structs out, no I/O. Every failure is an :class:`errors.InvalidJson`
or :class:`errors.InvalidPayload`.
"""

from __future__ import annotations

import hashlib
import typing
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, TypeVar

import msgspec
import orjson

from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from service.errors import InvalidJson, InvalidPayload

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Amounts beyond these bounds are not money; refusing them also keeps arithmetic downstream
# from being handed a 10**999999 to expand.
_MAX_DIGITS: Final = 40
_MAX_EXPONENT: Final = 40

_ANY: Final = msgspec.json.Decoder()
# msgspec refuses nesting deeper than the interpreter's recursion limit with RecursionError.
TOO_DEEP: Final = "JSON is nested too deeply"

T = TypeVar("T")


def decode_error(
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
            return InvalidJson(TOO_DEEP)
        message = str(exc)
        if prefix != "$":
            if "- at `$" in message:
                message = message.replace("- at `$", f"- at `{prefix}", 1)
            else:
                message = f"{message} - at `{prefix}`"
        return InvalidPayload(message)
    return InvalidJson(str(exc))


def decode_with(decoder: msgspec.json.Decoder[T], body: bytes, prefix: str = "$") -> T:
    """``body`` decoded by a prebuilt typed decoder; errors name the field from ``prefix``."""
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc, body, prefix) from None
    except RecursionError:
        raise InvalidJson(TOO_DEEP) from None


def finish(draft: InvoiceEvent, received_at: datetime, origin: Origin = "webhook") -> InvoiceEvent:
    """The event with its id, arrival time and origin: a provider's builder leaves them blank,
    because the id covers the content only."""
    return msgspec.structs.replace(
        draft, event_id=event_id(draft), received_at=received_at, origin=origin
    )


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
    nor ``received_at`` nor ``origin`` take part, so a repeat, however formatted, and the same
    facts read back by recovery have the same id."""
    content = msgspec.structs.asdict(event)
    del content["event_id"], content["received_at"], content["origin"]
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
    # Positional notation is bounded: amount() admits only modest exponents.
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _path(parts: tuple[object, ...]) -> str:
    return "".join(map(str, parts))


def amount(value: Decimal | None, *path: object) -> Decimal | None:
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


def required_amount(value: Decimal, *path: object) -> Decimal:
    amount(value, *path)
    return value


def parse_time(text: str, *path: object) -> datetime:
    """An ISO 8601 / RFC 3339 time; one without an offset is UTC (Bitfinex's
    ``YYYY-MM-DD hh:mm:ss`` is UTC). ``path`` as for :func:`_amount`."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidPayload(f"Invalid time {text[:64]!r} - at `{_path(path)}`") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def status_of(table: dict[str, InvoiceStatus], status: str, path: str) -> InvoiceStatus:
    try:
        return table[status]
    except KeyError:
        known = ", ".join(table)
        raise InvalidPayload(
            f"Unknown status {status[:32]!r}, expected one of {known} - at `{path}`"
        ) from None
