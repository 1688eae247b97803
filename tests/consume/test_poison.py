"""Records that must never stall the consumer nor move another order's money, against the real
broker and both real stores: a record the store refuses for its data goes to the DLQ with the
store's reason while the rest of its batch settles exactly once (DESIGN.md, rule 9), and an
event about another order's invoice goes to the DLQ as ``order_conflict`` (rule 8)."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson

from schemas.events import InvoiceEvent
from service.settings import Settings
from service.store import open_store
from tests.consume.test_pipeline import T0
from tests.fixtures_app import SEED_003, SEED_003_ORDER, ClientFactory, bitfinex, token_for
from tests.fixtures_consume import (
    Records,
    consumer_settings,
    counter,
    event_record,
    latest_settlements,
    produce,
    read_topic,
    running_consumer,
    settlements_of,
    wait_for,
)

NUL_INVOICE = "nul\u0000inv"
SEED_INVOICE = "a6761c8b-468f-40ad-a522-cc5e41c39757"


def event(
    invoice_id: str,
    n: int,
    *,
    status: str = "completed",
    payments: tuple[tuple[str, str], ...] = (),
    order_id: str | None = None,
) -> InvoiceEvent:
    """A Bitfinex event expecting 0.001 BTC; ``n`` orders it in provider time."""
    at = (T0 + timedelta(minutes=n)).isoformat()
    return msgspec.convert(
        {
            "event_id": f"{invoice_id}-{n}-{status}",
            "provider": "bitfinex",
            "invoice_id": invoice_id,
            "order_id": order_id or f"order-{invoice_id}",
            "status": status,
            "provider_status": status.upper(),
            "amount": "50",
            "currency": "USD",
            "pay_currency": "BTC",
            "expected_pay_amount": "0.001",
            "payments": [
                {"txid": tx, "amount": amount, "currency": "BTC", "created_at": at}
                for tx, amount in payments
            ],
            "occurred_at": at,
            "received_at": T0.isoformat(),
        },
        InvoiceEvent,
    )


def dlq_errors(records: Records) -> dict[bytes, str]:
    """The DLQ records' keys and ``error`` headers."""
    return {r.key: dict(r.headers)["error"].decode() for r in records if r.key is not None}


def batch_with_one_bad(bad_invoice: str) -> list[InvoiceEvent]:
    """An invoice paid in two steps around a bad record, another invoice paid at once."""
    return [
        event("a", 1, status="pending", payments=(("a1", "0.0004"),)),
        event(bad_invoice, 1, payments=(("x1", "0.001"),)),
        event("b", 1, payments=(("b1", "0.001"),)),
        event("a", 2, payments=(("a1", "0.0004"), ("a2", "0.0006"))),
    ]


async def settle_around_a_refused_record(settings: Settings, bad_invoice: str) -> str:
    """Runs the consumer over :func:`batch_with_one_bad`, then one more event once the bad
    record is in the DLQ; checks that everything else settled exactly once and that the
    consumer never restarted. Returns the bad record's DLQ ``error``."""
    s = settings
    await produce(s, [event_record(e) for e in batch_with_one_bad(bad_invoice)])
    bad_key = f"bitfinex:{bad_invoice}".encode()
    async with running_consumer(s) as consumer:
        dlq = await read_topic(s, s.dlq_topic, lambda rs: bad_key in dlq_errors(rs))
        # The consumer goes on: a later record is settled too.
        await produce(s, [event_record(event("c", 1, payments=(("c1", "0.001"),)))])
        records = await read_topic(
            s, s.settlements_topic, lambda rs: "bitfinex:c" in latest_settlements(rs)
        )
        await wait_for(
            lambda: counter(consumer, "payhook_consumer_events_total", outcome="processed") == 4,
            what="four events processed",
        )
        assert counter(consumer, "payhook_consumer_events_total", outcome="dlq") == 1
        assert counter(consumer, "payhook_consumer_restarts_total") == 0
    latest = latest_settlements(records)
    a, b = latest["bitfinex:a"], latest["bitfinex:b"]
    assert (a.state, a.paid_amount, a.version) == ("paid", Decimal("0.0010"), 2)
    assert [p.txid for p in a.payments] == ["a1", "a2"]
    assert (b.state, b.paid_amount, b.version) == ("paid", Decimal("0.001"), 1)
    assert f"bitfinex:{bad_invoice}" not in latest
    # Every version once: nothing counted twice by the record-by-record retry.
    versions = [(x.invoice_id, x.version) for x in settlements_of(records)]
    assert len(versions) == len(set(versions))
    (record,) = [r for r in dlq if r.key == bad_key]
    headers = dict(record.headers)
    assert headers["source-topic"] == s.events_topic.encode()
    assert headers["event-id"] == f"{bad_invoice}-1-completed".encode()
    return dlq_errors(dlq)[bad_key]


async def test_a_nul_that_postgres_cannot_store_goes_to_the_dlq_and_nothing_stalls(
    kafka_settings: Settings, postgres_url: str
) -> None:
    s = consumer_settings(kafka_settings, store_url=postgres_url)
    error = await settle_around_a_refused_record(s, NUL_INVOICE)
    assert error.startswith("store refused: CharacterNotInRepertoireError"), error


async def test_a_record_sqlite_refuses_goes_to_the_dlq_and_nothing_stalls(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "refusing.db"
    s = consumer_settings(kafka_settings, store_url=f"sqlite:///{path}")
    store = await open_store(s.store_url)
    await store.close()
    # SQLite holds any text (a NUL included), so the store refuses by a real constraint here.
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON invoices WHEN NEW.key LIKE '%refused%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END"
        )
    error = await settle_around_a_refused_record(s, "refused-inv")
    assert error.startswith("store refused: IntegrityError: refused by a constraint"), error


async def test_a_nul_is_settled_on_sqlite_which_can_hold_it(consume_settings: Settings) -> None:
    s = consume_settings
    await produce(s, [event_record(event(NUL_INVOICE, 1, payments=(("x1", "0.001"),)))])
    async with running_consumer(s):
        records = await read_topic(
            s, s.settlements_topic, lambda rs: f"bitfinex:{NUL_INVOICE}" in latest_settlements(rs)
        )
    assert latest_settlements(records)[f"bitfinex:{NUL_INVOICE}"].state == "paid"


# --- order_conflict, from the webhooks in ----------------------------------------------------


async def post(client: Any, settings: Settings, order: str, body: bytes) -> str:
    response = await client.post(
        f"/v1/webhooks/bitfinex/{order}",
        params={"token": token_for(settings, "bitfinex", order)},
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()
    event_id: str = (await response.json())["event_id"]
    return event_id


async def test_a_secret_for_one_order_cannot_change_another_orders_invoice(
    kafka_settings: Settings, app_client: ClientFactory
) -> None:
    s = consumer_settings(kafka_settings)
    client = await app_client(kafka_settings)
    await post(client, kafka_settings, SEED_003_ORDER, SEED_003)
    # With orderB's own token, a COMPLETED body about order123's invoice and forged amounts:
    # ingest cannot know the invoice's owner, the consumer does.
    forged = bitfinex(orderId="orderB")
    forged["invoices"][0]["amount"] = 1
    forged["payment"].update(txid="forged", amount=1, updated_at="2021-01-06 22:00:00")
    forged_id = await post(client, kafka_settings, "orderB", orjson.dumps(forged))
    # The real order's later events still apply.
    later = bitfinex()
    later["additionalPayments"] = [
        dict(later["payment"], txid="extra", amount=0.00000001, updated_at="2021-01-06 21:30:00")
    ]
    await post(client, kafka_settings, SEED_003_ORDER, orjson.dumps(later))

    key = f"bitfinex:{SEED_INVOICE}"
    async with running_consumer(s) as consumer:
        dlq = await read_topic(s, s.dlq_topic, lambda rs: len(rs) >= 1)
        records = await read_topic(
            s,
            s.settlements_topic,
            lambda rs: (
                latest_settlements(rs).get(key, None) is not None
                and latest_settlements(rs)[key].version == 2
            ),
        )
        await wait_for(
            lambda: counter(consumer, "payhook_order_conflicts_total", provider="bitfinex") == 1,
            what="the conflict to be counted",
        )
        # What the DLQ alert (PayhookDeadLetters) reads.
        assert counter(consumer, "payhook_consumer_events_total", outcome="dlq") == 1
        assert counter(consumer, "payhook_consumer_events_total", outcome="processed") == 2
    (record,) = dlq
    headers = dict(record.headers)
    assert headers["error"] == b"order_conflict"
    assert headers["event-id"] == forged_id.encode()
    for settlement in settlements_of(records):
        assert settlement.order_id == SEED_003_ORDER
        assert "forged" not in [p.txid for p in settlement.payments]
    final = latest_settlements(records)[key]
    assert (final.state, final.expected_amount) == ("overpaid", Decimal("0.00006262"))
    assert final.paid_amount == Decimal("0.00006263")


async def test_an_amount_beyond_the_bounds_of_money_goes_to_the_dlq_and_nothing_stalls(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """An event of another producer may hold what ingest refuses (DESIGN.md, Events: at most
    60 digits, an exponent within +-60): 1E+999990 is exact arithmetic for Python, and three
    megabytes of digits in plain notation, in a settlement no broker takes."""
    s = consumer_settings(kafka_settings, store_url=f"sqlite:///{tmp_path / 'bounds.db'}")
    huge = event("huge", 1, payments=(("h1", "1"),))
    huge = msgspec.structs.replace(
        huge,
        expected_pay_amount=Decimal("1E+999990"),
        payments=(msgspec.structs.replace(huge.payments[0], amount=Decimal("1E+999990")),),
    )
    # As another producer writes it: msgspec's own encoder keeps the exponent (ten bytes).
    key, _, headers = event_record(huge)
    value = msgspec.json.encode(huge)
    assert b'"1E+999990"' in value
    fine = event("d", 1, payments=(("d1", "0.001"),))
    await produce(s, [(key, value, headers), event_record(fine)])
    async with running_consumer(s) as consumer:
        dlq = await read_topic(s, s.dlq_topic, lambda rs: b"bitfinex:huge" in dlq_errors(rs))
        records = await read_topic(
            s, s.settlements_topic, lambda rs: "bitfinex:d" in latest_settlements(rs)
        )
        assert counter(consumer, "payhook_consumer_restarts_total") == 0
    assert "bitfinex:huge" not in latest_settlements(records)
    error = dlq_errors(dlq)[b"bitfinex:huge"]
    assert error.startswith("invalid: expected_pay_amount is beyond the bounds"), error
