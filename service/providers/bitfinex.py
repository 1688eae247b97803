"""Bitfinex Pay: its webhook decoded and normalized, and its invoice listing for recovery.

Authentication is per order: Bitfinex sends no header, so the order's secret rides in the
webhook URL's query string (``?token=``).

Recovery (``payhook recover``) lists every invoice whose ``t`` falls within a window from
``POST /v2/auth/r/ext/pay/invoices``, the listing Bitfinex points to for missed webhooks.
Its authentication (DESIGN.md, Recovery): headers ``bfx-nonce`` (strictly increasing for the key),
``bfx-apikey`` and ``bfx-signature`` = hex HMAC-SHA384(secret, ``/api`` + path + nonce + body)
over the exact body bytes sent. Bitfinex answers errors as ``["error", CODE, "message"]``,
authentication errors with HTTP 500.

A window answered with ``limit`` (100) invoices may hold more: it is split in two and each half
listed. The order of an answer is not documented, so nothing here depends on it. Requests are
made one at a time (a nonce that arrives after a larger one is refused) and paced to 90 a
minute, the provider's limit per key.

Each listed object goes through the webhook's own decoder and normalization. The listing adds
fields the webhook lacks (``customerInfo``, ``webhook`` with the per-order secret,
``merchantName``, ...): the decoder does not declare them, so they are dropped on decoding and
can reach neither a log line nor a topic.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal, final

import aiohttp
import msgspec

from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from schemas.providers import BitfinexInvoiceEntry, BitfinexPayment, BitfinexWebhook
from service.errors import PayhookError
from service.providers.api import (
    ApiError,
    Clock,
    CredentialsRejected,
    Pacer,
    RateLimited,
    RetryPolicy,
    Unavailable,
    Undecodable,
    request,
    retry_after,
)
from service.providers.normalize import (
    EPOCH,
    amount,
    decode_with,
    distinct,
    finish,
    latest_time,
    parse_time,
    required_amount,
    status_of,
    time_from_ms,
)
from service.providers.samples import SampleStatus, sample_json
from service.settings import Secret

BITFINEX_STATUS: Final[dict[str, InvoiceStatus]] = {
    "CREATED": "created",
    "PENDING": "pending",
    "COMPLETED": "completed",
    "EXPIRED": "expired",
}
_DECODER: Final = msgspec.json.Decoder(BitfinexWebhook)


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


def _draft(hook: BitfinexWebhook, until: datetime) -> InvoiceEvent:
    status = status_of(BITFINEX_STATUS, hook.status, "$.status")
    # ``t`` (the invoice's creation) is a provider time even when a payment's time is used.
    created_t = time_from_ms(hook.t, until, "$.t")
    payments: list[Payment] = []
    latest: datetime | None = None
    for path, p in _bitfinex_payments(hook):
        created = parse_time(p.created_at, until, path, ".created_at") if p.created_at else None
        if not p.updated_at:
            updated = None
        elif p.updated_at == p.created_at:  # the usual case: parsed once
            updated = created
        else:
            updated = parse_time(p.updated_at, until, path, ".updated_at")
        payments.append(
            Payment(
                txid=p.txid,
                amount=required_amount(p.amount, path, ".amount"),
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
        latest = created_t

    # Every entry's amount is due in its currency: each is checked, one is expected.
    due = [
        required_amount(e.amount, "$.invoices[", i, "].amount") for i, e in enumerate(hook.invoices)
    ]
    entry: BitfinexInvoiceEntry | None = None
    expected: Decimal | None = None
    pay_currency: str | None = None
    if hook.payment is not None:
        pay_currency = hook.payment.currency
        for candidate, candidate_due in zip(hook.invoices, due, strict=True):
            if candidate.payCurrency == pay_currency:
                entry, expected = candidate, candidate_due
                break
        else:
            # A COMPLETED webhook lists only the paid entry.
            if len(hook.invoices) == 1 and status == "completed":
                entry, expected = hook.invoices[0], due[0]
    elif len(hook.invoices) == 1:
        entry, expected = hook.invoices[0], due[0]
        pay_currency = entry.payCurrency
    return InvoiceEvent(
        event_id="",
        received_at=EPOCH,
        provider="bitfinex",
        invoice_id=hook.id,
        order_id=hook.orderId,
        status=status,
        provider_status=hook.status,
        amount=required_amount(hook.amount, "$.amount"),
        currency=hook.currency,
        pay_currency=pay_currency,
        expected_pay_amount=expected,
        # ``payment`` repeated inside ``additionalPayments`` is one payment.
        payments=distinct(payments) if len(payments) > 1 else tuple(payments),
        amount_diff=amount(hook.payment.amountDiff, "$.payment.amountDiff", signed=True)
        if hook.payment is not None
        else None,
        paid_total=None,
        occurred_at=latest,
    )


@final
class Bitfinex:
    name: Final = "bitfinex"
    title: Final = "Bitfinex"
    authentication: Final[Literal["per_order"]] = "per_order"
    token_in_url: Final = True
    registration_hint: Final = "(pass the URL as the invoice's `webhook`)"
    reports_running_total: Final = False

    def decode(self, body: bytes) -> BitfinexWebhook:
        return decode_with(_DECODER, body)

    def order_id_of(self, notification: BitfinexWebhook) -> str | None:
        return notification.orderId

    def normalize(
        self, notification: BitfinexWebhook, received_at: datetime, origin: Origin = "webhook"
    ) -> InvoiceEvent:
        return finish(_draft(notification, latest_time(received_at)), received_at, origin)

    def sample(self, status: SampleStatus, invoice_id: str, order_id: str, now: datetime) -> bytes:
        """A webhook as Bitfinex sends it (seed 003's shape): COMPLETED with its payment,
        PENDING with half of it paid, or EXPIRED unpaid."""
        due = Decimal("0.00040000")
        paid = {"completed": due, "partial": due / 2, "expired": None}[status]
        created = now - timedelta(minutes=10)
        body: dict[str, Any] = {
            "id": invoice_id,
            "type": "ECOMMERCE",
            "orderId": order_id,
            "status": {"completed": "COMPLETED", "partial": "PENDING", "expired": "EXPIRED"}[
                status
            ],
            "amount": Decimal("25.50"),
            "currency": "USD",
            "t": int(created.timestamp() * 1000),
            "invoices": [
                {
                    "amount": due,
                    "currency": "BTC",
                    "payCurrency": "BTC",
                    "poolCurrency": "BTC",
                    "address": "bc1qpayhooktestaddress0000000000000000000",
                }
            ],
        }
        if paid is not None:
            at = (now - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S")
            body["payment"] = {
                "txid": f"{invoice_id}-tx",
                "amount": paid,
                "currency": "BTC",
                "method": "BITCOIN",
                "status": "COMPLETED" if status == "completed" else "PENDING",
                "confirmations": 6 if status == "completed" else 1,
                "created_at": at,
                "updated_at": at,
                "depositId": 1,
            }
        return sample_json(body)


BITFINEX: Final = Bitfinex()


# --- Recovery: the provider's API -------------

PROVIDER: Final = "bitfinex"
PATH: Final = "/v2/auth/r/ext/pay/invoices"
LIMIT: Final = 100
REQUESTS_PER_MINUTE: Final = 90
SETTINGS: Final = "PAYHOOK_BITFINEX_API_KEY and PAYHOOK_BITFINEX_API_SECRET"
# apikey: digest invalid / invalid, nonce errors: a fresh nonce may cure one, not two.
_CREDENTIAL_ERRORS: Final = frozenset({10100, 10111, 10112, 10113, 10114})
_RATE_LIMIT_ERROR: Final = 11010

_LISTING: Final = msgspec.json.Decoder(list[msgspec.Raw])
_ANY: Final = msgspec.json.Decoder()


class _Ident(msgspec.Struct):
    id: Any = None


_IDENT: Final = msgspec.json.Decoder(_Ident)


@final
class Nonce:
    """Microseconds since the epoch, and never less than one more than the last one given.

    At 90 requests a minute the wall clock is always far ahead of the last nonce, so a restarted
    process (or the next ``--once``) starts above every nonce its predecessor used; within a
    process the guard keeps it strictly increasing even if the wall clock steps back. Two
    processes sharing a key would race: run one ``payhook recover`` per key.
    """

    __slots__ = ("_last", "_wall_us")

    def __init__(self, wall_us: Callable[[], int] | None = None) -> None:
        self._wall_us = wall_us or (lambda: time.time_ns() // 1000)
        self._last = 0

    def next(self) -> str:
        self._last = max(self._wall_us(), self._last + 1)
        return str(self._last)


def signature(secret: bytes, nonce: str, body: bytes) -> str:
    return hmac.new(secret, f"/api{PATH}{nonce}".encode() + body, hashlib.sha384).hexdigest()


def webhook_view(hook: BitfinexWebhook) -> BitfinexWebhook:
    """The listed invoice as its webhook would carry it, so the same facts give the same
    ``event_id``: an expired invoice's webhook has no ``invoices`` entries (seed 003), where
    the listing still shows every payable currency. A completed one's webhook lists only the
    paid entry, which normalization picks from the listing's entries the same way."""
    if hook.status == "EXPIRED" and hook.payment is None and hook.invoices:
        return msgspec.structs.replace(hook, invoices=[])
    return hook


def to_event(raw: bytes, received_at: datetime) -> InvoiceEvent:
    """One listed object through the webhook's decoder and normalization."""
    return BITFINEX.normalize(webhook_view(BITFINEX.decode(raw)), received_at, "recovery")


def _ident(raw: bytes, index: int) -> str:
    try:
        ident = _IDENT.decode(raw).id
    except msgspec.DecodeError:
        ident = None
    return ident[:64] if isinstance(ident, str) else f"#{index}"


@dataclass(slots=True)
class Page:
    """One window's answer: how many objects it held, those that normalized, those that did
    not (invoice id, reason)."""

    count: int
    events: list[InvoiceEvent] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Listing:
    """What a sweep over a lookback found: the latest event of every invoice read whole, and
    what could not be read (a window that failed, an object that did not decode)."""

    events: dict[str, InvoiceEvent] = field(default_factory=dict)
    listed: int = 0
    errors: list[str] = field(default_factory=list)


def page_of(body: bytes, received_at: datetime) -> Page:
    """Decodes a listing answer: an array of invoice objects, each decoded on its own so one
    bad object leaves the others usable. Raises :class:`Undecodable` for anything else."""
    try:
        raws = _LISTING.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise Undecodable(PROVIDER, "listing is not a JSON array of objects") from None
    page = Page(count=len(raws))
    for index, raw in enumerate(raws):
        try:
            page.events.append(to_event(bytes(raw), received_at))
        except PayhookError as exc:
            page.bad.append((_ident(bytes(raw), index), exc.detail[:200]))
        except RecursionError:
            page.bad.append((_ident(bytes(raw), index), "JSON is nested too deeply"))
    return page


def _error_code(body: bytes) -> tuple[int, str] | None:
    """``(CODE, message)`` of a ``["error", CODE, "message"]`` answer."""
    try:
        value = _ANY.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if (
        isinstance(value, list)
        and len(value) >= 2
        and value[0] == "error"
        and isinstance(value[1], int)
    ):
        message = value[2] if len(value) > 2 and isinstance(value[2], str) else ""
        return value[1], message[:80]
    return None


class _CredentialError(ApiError):
    pass


@final
class BitfinexApi:
    """The invoice listing, signed, paced and retried. One per process and key."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        url: str,
        key: Secret,
        secret: Secret,
        clock: Clock,
        policy: RetryPolicy,
        nonce: Nonce | None = None,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self._url = url.rstrip("/") + PATH
        self._key = key
        self._secret = secret
        self._clock = clock
        self._policy = policy
        self._nonce = nonce or Nonce()
        self._pacer = Pacer(clock, REQUESTS_PER_MINUTE)
        self._one_at_a_time = asyncio.Lock()
        self._on_request = on_request or (lambda outcome: None)

    async def list_invoices(self, start_ms: int, end_ms: int, received_at: datetime) -> Listing:
        """Every invoice with ``start_ms <= t <= end_ms``. Windows that fail after their
        retries are reported in ``errors``; credentials refused end the listing at once."""
        listing = Listing()
        windows = [(start_ms, end_ms)]
        bad: dict[str, str] = {}
        while windows:
            start, end = windows.pop()
            try:
                page = await self._window(start, end, received_at)
            except CredentialsRejected:
                raise
            except ApiError as exc:
                listing.errors.append(f"window {start}..{end}: {exc.reason}")
                continue
            if page.count >= LIMIT and start < end:
                middle = (start + end) // 2
                windows += [(middle + 1, end), (start, middle)]
                continue
            if page.count >= LIMIT:
                listing.errors.append(
                    f"{LIMIT} or more invoices created in millisecond {start}: some may be missed"
                )
            for event in page.events:
                listing.events[event.invoice_id] = event
                bad.pop(event.invoice_id, None)
            for ident, reason in page.bad:
                bad[ident] = reason
        listing.errors += [f"invoice {ident}: {reason}" for ident, reason in bad.items()]
        listing.listed = len(listing.events) + len(bad)
        return listing

    async def _window(self, start: int, end: int, received_at: datetime) -> Page:
        """One window, retried while it fails, is malformed or holds an object that does not
        decode; after the last try, the objects that decoded are kept and the rest reported."""
        body = msgspec.json.encode({"start": start, "end": end, "limit": LIMIT})
        attempts = self._policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                page = page_of(await self._post(body), received_at)
            except ApiError as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                pause = self._policy.pause(exc, attempt)
            else:
                if not page.bad or attempt == attempts:
                    return page
                pause = self._policy.backoff(attempt)
            self._on_request("retry")
            await self._clock.sleep(pause)
        raise AssertionError("unreachable")

    async def _post(self, body: bytes) -> bytes:
        """One request (and one more with a fresh nonce after a credential or nonce error)."""
        for attempt in (1, 2):
            try:
                return await self._send(body)
            except _CredentialError as exc:
                if attempt == 2:
                    raise CredentialsRejected(PROVIDER, f"{exc.reason}: check {SETTINGS}") from None
        raise AssertionError("unreachable")

    async def _send(self, body: bytes) -> bytes:
        async with self._one_at_a_time:
            await self._pacer.wait()
            nonce = self._nonce.next()
            headers = {
                "bfx-nonce": nonce,
                "bfx-apikey": self._key.reveal().decode(),
                "bfx-signature": signature(self._secret.reveal(), nonce, body),
                "Content-Type": "application/json",
            }
            try:
                status, answer_headers, answer = await request(
                    PROVIDER,
                    self._session,
                    "POST",
                    self._url,
                    headers=headers,
                    data=body,
                    timeout=self._policy.timeout,
                )
            except ApiError:
                self._on_request("unavailable")
                raise
        error = _error_code(answer)
        if status == 429 or (error is not None and error[0] == _RATE_LIMIT_ERROR):
            self._on_request("rate_limited")
            raise RateLimited(PROVIDER, "rate limited", retry_after(answer_headers))
        if error is not None and error[0] in _CREDENTIAL_ERRORS:
            self._on_request("refused")
            raise _CredentialError(PROVIDER, f"error {error[0]} {error[1]!r}")
        if status in (401, 403):
            self._on_request("refused")
            raise _CredentialError(PROVIDER, f"HTTP {status}")
        if status != 200 or error is not None:
            self._on_request("unavailable")
            what = f"error {error[0]} {error[1]!r}" if error else "an unexpected answer"
            raise Unavailable(PROVIDER, f"HTTP {status} with {what}")
        self._on_request("ok")
        return answer
