"""What the store keeps of one invoice: the facts of every event applied to it and its current
settlement. The consumer writes it; recovery and the operator's commands read it back, so it
lives here, apart from any process's package."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec

from schemas.events import InvoiceStatus, Payment, Settlement


# gc=False: these hold no reference cycles, so the collector need not track millions of them.
class Fact(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """What reconciliation needs of one applied event."""

    event_id: str
    status: InvoiceStatus
    occurred_at: datetime
    order_id: str | None
    pay_currency: str | None
    expected_amount: Decimal | None
    amount_diff: Decimal | None
    paid_total: Decimal | None
    payments: tuple[Payment, ...]


class InvoiceState(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """Everything stored for one invoice: the applied facts and the current settlement."""

    facts: tuple[Fact, ...]
    settlement: Settlement

    def has_event(self, event_id: str) -> bool:
        return any(f.event_id == event_id for f in self.facts)

    def order_id(self) -> str | None:
        """The order the invoice was first seen with (the first fact that names one)."""
        return next((f.order_id for f in self.facts if f.order_id is not None), None)


def invoice_key(provider: str, invoice_id: str) -> str:
    """The Kafka key and store key of an invoice."""
    return f"{provider}:{invoice_id}"
