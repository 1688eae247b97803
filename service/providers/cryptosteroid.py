"""CryptoSteroid: its invoice callback decoded and normalized.

Authentication is per order: the order's secret is given to CryptoSteroid as the invoice's
``secret`` and comes back in the ``Token`` header. Its payments state a running total
(``payment.paid.received``), not each transaction's own amount.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Final, Literal, final

import msgspec

from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from schemas.providers import CryptoSteroidInvoice
from service.providers.normalize import (
    EPOCH,
    amount,
    decode_with,
    finish,
    parse_time,
    required_amount,
    status_of,
)

CRYPTOSTEROID_STATUS: Final[dict[str, InvoiceStatus]] = {
    "NEW": "created",
    "WAITING": "pending",
    "PAID": "completed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
}

_DECODER: Final = msgspec.json.Decoder(CryptoSteroidInvoice)


def _draft(invoice: CryptoSteroidInvoice) -> InvoiceEvent:
    status = status_of(CRYPTOSTEROID_STATUS, invoice.status, "$.status")
    if invoice.updatedAt:
        occurred = parse_time(invoice.updatedAt, "$.updatedAt")
    else:
        occurred = parse_time(invoice.createdAt, "$.createdAt")
    pay = invoice.payment
    payments: tuple[Payment, ...] = ()
    paid_total: Decimal | None = None
    if pay is not None and pay.paid is not None:
        paid_total = amount(pay.paid.received, "$.payment.paid.received")
        # A hash's own amount is not stated; only the running total is.
        payments = tuple(
            Payment(txid=h, amount=None, currency=pay.method, method=pay.method)
            for h in pay.paid.hash
        )
    return InvoiceEvent(
        event_id="",
        received_at=EPOCH,
        provider="cryptosteroid",
        invoice_id=invoice.invoiceId,
        order_id=invoice.externalId,
        status=status,
        provider_status=invoice.status,
        amount=required_amount(invoice.fiatAmount, "$.fiatAmount"),
        currency=invoice.fiatCurrency,
        pay_currency=pay.method if pay is not None else None,
        expected_pay_amount=amount(pay.amount, "$.payment.amount") if pay is not None else None,
        payments=payments,
        amount_diff=None,
        paid_total=paid_total,
        occurred_at=occurred,
    )


@final
class CryptoSteroid:
    name: Final = "cryptosteroid"
    title: Final = "CryptoSteroid"
    authentication: Final[Literal["per_order"]] = "per_order"
    token_in_url: Final = False
    registration_hint: Final = (
        "(pass the secret as the invoice's `secret` and the URL as its `processingUrl`)"
    )
    reports_running_total: Final = True

    def decode(self, body: bytes) -> CryptoSteroidInvoice:
        return decode_with(_DECODER, body)

    def order_id_of(self, notification: CryptoSteroidInvoice) -> str | None:
        return notification.externalId

    def normalize(
        self, notification: CryptoSteroidInvoice, received_at: datetime, origin: Origin = "webhook"
    ) -> InvoiceEvent:
        return finish(_draft(notification), received_at, origin)


CRYPTOSTEROID: Final = CryptoSteroid()
