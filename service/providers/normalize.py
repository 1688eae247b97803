"""What every provider's normalization shares: decode errors that name the field the way
msgspec does (``- at `$.payment.updated_at```), amount checks, times, status tables and the
content-derived ``event_id``.

Pure: bytes or Structs in, Structs out, no I/O. Every failure is an :class:`errors.InvalidJson`
or :class:`errors.InvalidPayload`.
"""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, TypeVar

import msgspec
import orjson

from schemas.amounts import PROVIDER_DECIMAL
from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from service.errors import InvalidJson, InvalidPayload

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
LAST_TIME: Final = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
# A provider time further ahead of its arrival is refused: it would pin a running total.
FUTURE_SLACK: Final = timedelta(hours=24)
_MILLISECOND: Final = timedelta(milliseconds=1)
# Amounts beyond these bounds are not money (DESIGN.md, Events); refusing them also keeps
# arithmetic downstream from being handed a 10**999999 to expand.
MAX_DIGITS: Final = 60
MAX_EXPONENT: Final = 60
_DECIMAL_TEXT: Final = re.compile(PROVIDER_DECIMAL.removeprefix("^").removesuffix("$"))

_ANY: Final = msgspec.json.Decoder()
_STR: Final = msgspec.json.Decoder(str)
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


def _refuse(message: str, path: tuple[object, ...]) -> InvalidPayload:
    return InvalidPayload(f"{message} - at `{_path(path)}`")


def _amount_text(raw: msgspec.Raw, path: tuple[object, ...]) -> str | None:
    """The decimal text of a raw JSON amount (None for null or absent), in ASCII decimal
    syntax. ``Decimal()`` alone would read other scripts' digits, ``_`` and blanks."""
    data = bytes(raw)
    if not data or data == b"null":
        return None
    first = data[0]
    if first == 0x22:  # '"': a string, unescaped by msgspec only when it holds an escape
        try:
            text = _STR.decode(data) if b"\\" in data else data[1:-1].decode()
        except (UnicodeDecodeError, msgspec.DecodeError):
            # The raw text was not checked for UTF-8 by the decoder that cut it out.
            raise InvalidJson("the body is not valid UTF-8 JSON") from None
        if _DECIMAL_TEXT.fullmatch(text) is None:
            raise _refuse(f"Expected a decimal in ASCII digits, got {text[:32]!r}", path)
        return text
    if first == 0x2D or 0x30 <= first <= 0x39:  # '-' or a digit: a JSON number, ASCII already
        return data.decode()
    raise _refuse("Expected a decimal number or string", path)


def amount(raw: msgspec.Raw, *path: object, signed: bool = False) -> Decimal | None:
    """The provider's amount (None when null or absent): ASCII decimal syntax, at most
    :data:`MAX_DIGITS` significant digits, an exponent within +-:data:`MAX_EXPONENT`, and not
    negative (negative zero included) unless ``signed`` (``amountDiff``). ``path`` names the
    field, in pieces joined only for an error message: this runs for every amount of every
    request."""
    text = _amount_text(raw, path)
    if text is None:
        return None
    value = Decimal(text)
    # Plain text no longer than MAX_DIGITS is within both bounds; only longer text or an
    # exponent needs the digits counted (as_tuple() costs about a third of this function).
    if len(text) > MAX_DIGITS or "e" in text or "E" in text:
        _, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int)  # the syntax admits no NaN or infinity
        if len(digits) > MAX_DIGITS or not -MAX_EXPONENT <= exponent <= MAX_EXPONENT:
            raise _refuse(
                f"Decimal out of range (at most {MAX_DIGITS} digits, exponent within "
                f"+-{MAX_EXPONENT})",
                path,
            )
    if not signed and value.is_signed():
        raise _refuse(f"Expected a decimal >= 0, got {text[:32]!r}", path)
    return value


def within_bounds(value: Decimal) -> bool:
    """True for a finite amount that :func:`amount` could have admitted, however it was
    written since: in plain notation an integer's trailing zeros become digits (``1e60`` is
    read back as 61 digits), so they are not counted, and a value admitted with its exponent
    at the bound may carry up to ``MAX_DIGITS`` digits above it. For what payhook did not
    read itself (an event from another producer): what is beyond is not money, and in plain
    notation it could take megabytes (``1E+999990``)."""
    if not value.is_finite():
        return False
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not value:  # "0E-3000000" would be three megabytes of zeros
        return exponent >= -MAX_EXPONENT
    if len(digits) > MAX_DIGITS + MAX_EXPONENT:  # more than any admitted amount reads back with
        return False
    significant = len(digits)
    while digits[significant - 1] == 0:  # trailing zeros: not significant (value != 0)
        significant -= 1
    exponent += len(digits) - significant
    return (
        significant <= MAX_DIGITS
        and exponent >= -MAX_EXPONENT
        and exponent + significant <= MAX_EXPONENT + MAX_DIGITS
    )


def required_amount(raw: msgspec.Raw, *path: object) -> Decimal:
    value = amount(raw, *path)
    if value is None:
        raise _refuse("Expected a decimal, got null", path)
    return value


def latest_time(received_at: datetime) -> datetime:
    """The latest provider time accepted for a notification received at ``received_at``."""
    return min(received_at + FUTURE_SLACK, LAST_TIME)


def parse_time(text: str, latest: datetime, *path: object) -> datetime:
    """An ISO 8601 / RFC 3339 time in UTC, one without an offset taken as UTC (Bitfinex's
    ``YYYY-MM-DD hh:mm:ss`` is UTC), within 1970 .. ``latest``. ``path`` as for
    :func:`amount`."""
    try:
        value = datetime.fromisoformat(text)
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except ValueError:
        raise _refuse(f"Invalid time {text[:64]!r}", path) from None
    except OverflowError:
        raise _refuse(f"Time out of range {text[:64]!r}", path) from None
    if not EPOCH <= value <= latest:
        raise _refuse(f"Time out of range {text[:64]!r}", path)
    return value


def time_from_ms(ms: int, latest: datetime, *path: object) -> datetime:
    """Milliseconds since the epoch (Bitfinex ``t``), within 1970 .. ``latest``."""
    if not 0 <= ms <= (latest - EPOCH) // _MILLISECOND:
        raise _refuse(f"Timestamp out of range {ms}", path)
    return EPOCH + timedelta(milliseconds=ms)


def distinct(payments: Iterable[Payment]) -> tuple[Payment, ...]:
    """Each (currency, txid) once, where the first copy stood: the copy with the most
    confirmations, then the latest ``updated_at``; the first of equal copies."""
    kept: dict[tuple[str, str], Payment] = {}
    for payment in payments:
        ident = (payment.currency, payment.txid)
        held = kept.get(ident)
        if held is None or _copy_rank(payment) > _copy_rank(held):
            kept[ident] = payment
    return tuple(kept.values())


def _copy_rank(payment: Payment) -> tuple[int, datetime]:
    confirmations = -1 if payment.confirmations is None else payment.confirmations
    return (confirmations, payment.updated_at or EPOCH)


def status_of(table: dict[str, InvoiceStatus], status: str, path: str) -> InvoiceStatus:
    try:
        return table[status]
    except KeyError:
        known = ", ".join(table)
        raise InvalidPayload(
            f"Unknown status {status[:32]!r}, expected one of {known} - at `{path}`"
        ) from None
