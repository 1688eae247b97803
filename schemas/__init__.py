"""payhook's payload schemas: provider notifications in, published events out."""

from schemas.events import (
    INVOICE_EVENT_SCHEMA,
    PROVIDERS,
    SETTLEMENT_SCHEMA,
    InvoiceEvent,
    InvoiceStatus,
    Payment,
    Provider,
    Settlement,
    SettlementState,
)

__all__ = [
    "INVOICE_EVENT_SCHEMA",
    "PROVIDERS",
    "SETTLEMENT_SCHEMA",
    "InvoiceEvent",
    "InvoiceStatus",
    "Payment",
    "Provider",
    "Settlement",
    "SettlementState",
]
