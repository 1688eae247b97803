"""The events payhook publishes. Downstream consumers import these to decode our topics.

Evolution: add fields with defaults; never change a field's type (a new type is a new topic
version). Every amount is a ``Decimal`` and is encoded as a decimal string.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

Provider = Literal["bitfinex", "cryptosteroid", "cryptopos"]
PROVIDERS: tuple[Provider, ...] = ("bitfinex", "cryptosteroid", "cryptopos")

InvoiceStatus = Literal["created", "pending", "completed", "expired", "cancelled"]

# How an event reached payhook: a provider's notification, or read back from its API by
# ``payhook recover``. Not part of ``event_id``: the same facts have one id either way.
Origin = Literal["webhook", "recovery"]

SettlementState = Literal[
    "awaiting_payment",
    "partially_paid",
    "paid",
    "overpaid",
    "underpaid",
    "expired",
    "expired_underpaid",
    "cancelled",
]

# A time with its offset, always written in UTC: the JSON Schemas say ``format: date-time``
# (msgspec says so only of an aware datetime), and a decoder refuses a naive one.
Instant = Annotated[datetime, msgspec.Meta(tz=True)]

INVOICE_EVENT_SCHEMA = "payhook.invoice-event.v1"
SETTLEMENT_SCHEMA = "payhook.settlement.v1"


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    """One on-chain (or instant) payment towards an invoice, identified by (currency, txid)."""

    txid: str
    amount: Decimal | None
    currency: str
    method: str | None = None
    confirmations: int | None = None
    created_at: Instant | None = None
    updated_at: Instant | None = None
    force_completed: bool = False
    # Crypto POS states both the USD value (``amount``) and the crypto amount.
    crypto_amount: Decimal | None = None


class InvoiceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One provider notification, normalized. ``event_id`` is derived from the content."""

    schema: Literal["payhook.invoice-event.v1"] = "payhook.invoice-event.v1"
    event_id: str
    provider: Provider
    invoice_id: str
    order_id: str | None
    status: InvoiceStatus
    provider_status: str
    amount: Decimal
    currency: str
    pay_currency: str | None = None
    expected_pay_amount: Decimal | None = None
    payments: tuple[Payment, ...] = ()
    amount_diff: Decimal | None = None
    origin: Origin = "webhook"
    paid_total: Decimal | None = None
    occurred_at: Instant
    received_at: Instant


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """What an invoice has settled to so far; ``version`` grows by one per real change."""

    schema: Literal["payhook.settlement.v1"] = "payhook.settlement.v1"
    provider: Provider
    invoice_id: str
    order_id: str | None
    state: SettlementState
    force_completed: bool
    pay_currency: str | None
    expected_amount: Decimal | None
    paid_amount: Decimal
    difference: Decimal | None
    provider_amount_diff: Decimal | None
    discrepancy: bool
    payments: tuple[Payment, ...]
    version: int
    last_event_id: str
    updated_at: Instant
