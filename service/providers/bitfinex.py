"""Bitfinex Pay: its webhook decoded and normalized.

Authentication is per order: Bitfinex sends no header, so the order's secret rides in the
webhook URL's query string (``?token=``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final, Literal, final

import msgspec

from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from schemas.providers import BitfinexInvoiceEntry, BitfinexPayment, BitfinexWebhook
from service.errors import InvalidPayload
from service.providers.normalize import (
    EPOCH,
    amount,
    decode_with,
    finish,
    parse_time,
    required_amount,
    status_of,
)

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


def _draft(hook: BitfinexWebhook) -> InvoiceEvent:
    status = status_of(BITFINEX_STATUS, hook.status, "$.status")
    payments: list[Payment] = []
    latest: datetime | None = None
    for path, p in _bitfinex_payments(hook):
        created = parse_time(p.created_at, path, ".created_at") if p.created_at else None
        if not p.updated_at:
            updated = None
        elif p.updated_at == p.created_at:  # the usual case: parsed once
            updated = created
        else:
            updated = parse_time(p.updated_at, path, ".updated_at")
        payments.append(
            Payment(
                txid=p.txid,
                amount=amount(p.amount, path, ".amount"),
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
            latest = EPOCH + timedelta(milliseconds=hook.t)
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
        received_at=EPOCH,
        provider="bitfinex",
        invoice_id=hook.id,
        order_id=hook.orderId,
        status=status,
        provider_status=hook.status,
        amount=required_amount(hook.amount, "$.amount"),
        currency=hook.currency,
        pay_currency=pay_currency,
        expected_pay_amount=amount(entry.amount, "$.invoices[", entry_index, "].amount")
        if entry is not None
        else None,
        payments=tuple(payments),
        amount_diff=amount(hook.payment.amountDiff, "$.payment.amountDiff")
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
        return finish(_draft(notification), received_at, origin)


BITFINEX: Final = Bitfinex()
