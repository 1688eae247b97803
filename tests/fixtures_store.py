"""The store on both of its databases: a fresh SQLite file and the embedded PostgreSQL, and the
Bitfinex events the store tests apply to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from schemas.events import InvoiceEvent
from service.store import Store, open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def bitfinex_event(
    n: int, *, invoice_id: str = "inv-1", order_id: str | None = "o-1", status: str = "pending"
) -> InvoiceEvent:
    """Event ``n`` about one Bitfinex invoice: it carries payment ``txn`` of 0.001 BTC."""
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-e{n}",
            "provider": "bitfinex",
            "invoice_id": invoice_id,
            "order_id": order_id,
            "status": status,
            "provider_status": status.upper(),
            "amount": "100",
            "currency": "USD",
            "pay_currency": "BTC",
            "expected_pay_amount": "1",
            "payments": [
                {"txid": f"tx{n}", "amount": "0.001", "currency": "BTC", "confirmations": 1}
            ],
            "occurred_at": (T0 + timedelta(seconds=n)).isoformat(),
            "received_at": (T0 + timedelta(seconds=n)).isoformat(),
        },
        InvoiceEvent,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test twice: on a fresh SQLite file and on the embedded PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()
