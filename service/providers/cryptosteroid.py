"""CryptoSteroid: its invoice callback decoded and normalized; the invoice read back.

Authentication is per order: the order's secret is given to CryptoSteroid as the invoice's
``secret`` and comes back in the ``Token`` header. Its payments state a running total
(``payment.paid.received``), not each transaction's own amount.

Recovery (``payhook recover``) re-reads an invoice from the merchant API:
``GET {url}/merchants/{merchant}/invoices/{invoice_id}`` with header ``X-Api-Key``. The seeds
document ``X-Api-Key`` and the ``/merchants/:merchant/invoices`` collection (creating an
invoice); reading one invoice at ``.../invoices/{id}`` is an assumption (DESIGN.md), and so is
its answer being the same ``Invoice`` object the notification carries. It goes through the
notification's own decoder and normalization.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal, final
from urllib.parse import quote

import msgspec

from schemas.events import InvoiceEvent, InvoiceStatus, Origin, Payment
from schemas.providers import CryptoSteroidInvoice
from service.providers.api import StatusEndpoint, Undecodable
from service.providers.normalize import (
    EPOCH,
    amount,
    decode_with,
    finish,
    latest_time,
    parse_time,
    required_amount,
    status_of,
)
from service.providers.samples import SampleStatus, iso_millis, sample_json
from service.settings import Secret

CRYPTOSTEROID_STATUS: Final[dict[str, InvoiceStatus]] = {
    "NEW": "created",
    "WAITING": "pending",
    "PAID": "completed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
}

_DECODER: Final = msgspec.json.Decoder(CryptoSteroidInvoice)


def _draft(invoice: CryptoSteroidInvoice, until: datetime) -> InvoiceEvent:
    status = status_of(CRYPTOSTEROID_STATUS, invoice.status, "$.status")
    occurred = parse_time(invoice.createdAt, until, "$.createdAt")
    if invoice.updatedAt:
        occurred = parse_time(invoice.updatedAt, until, "$.updatedAt")
    pay = invoice.payment
    payments: tuple[Payment, ...] = ()
    paid_total: Decimal | None = None
    if pay is not None:
        # Not published, but a provider amount all the same: checked like the others.
        amount(pay.net, "$.payment.net")
        amount(pay.fee, "$.payment.fee")
    if pay is not None and pay.paid is not None:
        paid_total = required_amount(pay.paid.received, "$.payment.paid.received")
        amount(pay.paid.fiat, "$.payment.paid.fiat")
        # A hash's own amount is not stated; only the running total is. Each hash once.
        payments = tuple(
            Payment(txid=h, amount=None, currency=pay.method, method=pay.method)
            for h in dict.fromkeys(pay.paid.hash)
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
        expected_pay_amount=required_amount(pay.amount, "$.payment.amount")
        if pay is not None
        else None,
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
        return finish(_draft(notification, latest_time(received_at)), received_at, origin)

    def sample(self, status: SampleStatus, invoice_id: str, order_id: str, now: datetime) -> bytes:
        """An invoice object as CryptoSteroid sends it to ``processingUrl``: PAID in full,
        WAITING with part of it received, or EXPIRED unpaid."""
        due = Decimal("100.50")
        received = {"completed": due, "partial": Decimal("50.25"), "expired": Decimal("0")}[status]
        created = now - timedelta(minutes=10)
        body: dict[str, Any] = {
            "merchantId": "payhook-test-merchant",
            "invoiceId": invoice_id,
            "fiatAmount": "100.00",
            "fiatCurrency": "USD",
            "description": "payhook send-test",
            "whoPayCommission": "buyer",
            "payment": {
                "method": "USDT_TRC20",
                "address": "TPayhookTestAddress000000000000000",
                "amount": str(due),
                "net": "100.00",
                "fee": "0.50",
                "paid": {
                    "hash": [] if status == "expired" else [f"{invoice_id}-tx"],
                    "received": str(received),
                    "finished": status == "completed",
                },
            },
            "externalId": order_id,
            "processingUrl": None,
            "timeoutSeconds": 1800,
            "createdAt": iso_millis(created),
            "expiresAt": iso_millis(created + timedelta(seconds=1800)),
            "updatedAt": iso_millis(now - timedelta(minutes=1)),
            "status": {"completed": "PAID", "partial": "WAITING", "expired": "EXPIRED"}[status],
        }
        return sample_json(body)


CRYPTOSTEROID: Final = CryptoSteroid()


# --- Recovery: the provider's API -------------

PROVIDER: Final = "cryptosteroid"
SETTINGS: Final = "PAYHOOK_CRYPTOSTEROID_API_KEY and PAYHOOK_CRYPTOSTEROID_MERCHANT_ID"


def to_event(body: bytes, invoice_id: str, received_at: datetime) -> InvoiceEvent:
    """The answer through the notification's decoder and normalization."""
    invoice = CRYPTOSTEROID.decode(body)
    if invoice.invoiceId != invoice_id:
        raise Undecodable(PROVIDER, "the answer is about another invoice")
    return CRYPTOSTEROID.normalize(invoice, received_at, "recovery")


def status_endpoint(url: str, key: Secret, merchant_id: str) -> StatusEndpoint:
    return StatusEndpoint(
        provider=PROVIDER,
        settings=SETTINGS,
        base=f"{url.rstrip('/')}/merchants/{quote(merchant_id, safe='')}/invoices/",
        headers={"X-Api-Key": key.reveal().decode(), "Accept": "application/json"},
        to_event=to_event,
    )
