"""End to end: provider webhooks POSTed to the ingest app, the consumer, settlements read back
from Kafka. Real app, real broker, real store; nothing in between is stubbed."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient

from schemas.events import Settlement
from service.settings import Settings
from tests.fixtures_app import (
    SEED_003,
    SEED_003_ORDER,
    ClientFactory,
    bitfinex,
    cryptopos_body,
    cryptopos_data,
    cryptosteroid,
    encode,
    token_for,
)
from tests.fixtures_consume import (
    Records,
    consumer_settings,
    counter,
    read_topic,
    running_consumer,
    validate_records,
)

SEED_INVOICE = "a6761c8b-468f-40ad-a522-cc5e41c39757"


async def post_bitfinex(
    client: TestClient[Any, Any], settings: Settings, order: str, body: bytes
) -> str:
    token = token_for(settings, "bitfinex", order)
    response = await client.post(
        f"/v1/webhooks/bitfinex/{order}",
        params={"token": token},
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()
    event_id: str = (await response.json())["event_id"]
    return event_id


def bitfinex_hook(invoice: str, order: str, **overrides: Any) -> bytes:
    """A COMPLETED Bitfinex webhook of its own invoice and order (seed 003 otherwise)."""
    return encode(bitfinex(id=invoice, orderId=order, **overrides))


def payment(txid: str, amount: str, updated: str = "2021-01-06 21:16:28", **extra: Any) -> Any:
    return {
        "txid": txid,
        "amount": json.loads(amount),  # a JSON number, as Bitfinex sends it
        "currency": "BTC",
        "method": "BITCOIN",
        "status": "COMPLETED",
        "confirmations": 6,
        "created_at": updated,
        "updated_at": updated,
        **extra,
    }


def raw_latest(records: Records) -> dict[str, dict[str, Any]]:
    """The latest settlement per invoice, as the JSON text on the topic says it."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        value = json.loads(record.value)
        key = record.key.decode()
        if key not in latest or value["version"] > latest[key]["version"]:
            latest[key] = value
    return latest


async def test_webhooks_to_settlements(kafka_settings: Settings, app_client: ClientFactory) -> None:
    s = consumer_settings(kafka_settings)
    client = await app_client(kafka_settings)
    BTC = [{"amount": 0.001, "currency": "BTC", "payCurrency": "BTC", "poolCurrency": "BTC"}]

    # Seed 003, exactly as documented, and its duplicate (Bitfinex never retries, but a
    # proxy or an operator may replay it).
    seed_id = await post_bitfinex(client, kafka_settings, SEED_003_ORDER, SEED_003)
    assert await post_bitfinex(client, kafka_settings, SEED_003_ORDER, SEED_003) == seed_id

    # Underpaid, topped up by additionalPayments, still short; amountDiff agrees.
    await post_bitfinex(
        client,
        kafka_settings,
        "o-under",
        bitfinex_hook(
            "inv-under",
            "o-under",
            invoices=BTC,
            payment=payment("u1", "0.0004", amountDiff="-0.0003"),
            additionalPayments=[payment("u2", "0.0003", "2021-01-06 21:20:00")],
        ),
    )
    # The payment repeated inside additionalPayments counts once.
    await post_bitfinex(
        client,
        kafka_settings,
        "o-repeat",
        bitfinex_hook(
            "inv-repeat",
            "o-repeat",
            invoices=BTC,
            payment=payment("r1", "0.001"),
            additionalPayments=[payment("r1", "0.001")],
        ),
    )
    # Manually completed though underpaid; amountDiff disagrees with our difference.
    await post_bitfinex(
        client,
        kafka_settings,
        "o-force",
        bitfinex_hook(
            "inv-force",
            "o-force",
            invoices=BTC,
            payment=payment("f1", "0.0009", forceCompleted=True, amountDiff="0.0002"),
        ),
    )
    # COMPLETED, then EXPIRED: completion is final, the expiry publishes nothing.
    await post_bitfinex(
        client,
        kafka_settings,
        "o-exp",
        bitfinex_hook("inv-exp", "o-exp", invoices=BTC, payment=payment("e1", "0.001")),
    )
    expired = bitfinex(id="inv-exp", orderId="o-exp", status="EXPIRED", invoices=[])
    del expired["payment"]
    await post_bitfinex(client, kafka_settings, "o-exp", encode(expired))

    # CryptoSteroid: partly paid, then paid (its running total, not a sum).
    for status, received, hashes, updated in (
        ("WAITING", "60.25", ["h1"], "2024-05-01T10:05:00.000Z"),
        ("PAID", "100.50", ["h1", "h2"], "2024-05-01T10:09:00.000Z"),
    ):
        body = cryptosteroid(status=status, updatedAt=updated)
        body["payment"]["paid"] = {"hash": hashes, "received": received, "finished": False}
        response = await client.post(
            "/v1/webhooks/cryptosteroid/order-42",
            data=encode(body),
            headers={
                "Token": token_for(kafka_settings, "cryptosteroid", "order-42"),
                "Content-Type": "application/json",
            },
        )
        assert response.status == 200, await response.text()

    # Crypto POS: a partial payment, then completion.
    tx1 = cryptopos_data()["transactions"][0]
    partial = cryptopos_data(
        completed=False, paidAmount=0.04, transactions=[{**tx1, "amount": 0.04}]
    )
    tx2 = {**tx1, "tx": "0xsecond", "amount": 0.06, "timestamp": "2024-09-05T21:05:00.000Z"}
    complete = cryptopos_data(paidAmount=0.1, transactions=[{**tx1, "amount": 0.04}, tx2])
    for data in (partial, complete):
        response = await client.post(
            "/v1/webhooks/cryptopos",
            data=cryptopos_body(data),
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()

    wanted = {
        f"bitfinex:{SEED_INVOICE}": "paid",
        "bitfinex:inv-under": "underpaid",
        "bitfinex:inv-repeat": "paid",
        "bitfinex:inv-force": "underpaid",
        "bitfinex:inv-exp": "paid",
        "cryptosteroid:cs-inv-1": "paid",
        "cryptopos:66da1bc34f03a871430c1a71": "paid",
    }

    def settled(records: Records) -> bool:
        latest = raw_latest(records)
        return all(latest.get(k, {}).get("state") == v for k, v in wanted.items())

    async with running_consumer(s) as consumer:
        records = await read_topic(s, s.settlements_topic, settled)
        # Every event is accounted for: 11 posted, one of them a duplicate.
        await wait_counted(consumer, 10, 1)
    events = await read_topic(s, s.events_topic, lambda got: len(got) >= 11)
    # Any standard validator with format checking accepts every record published.
    validate_records(events, "invoice-event.v1.json")
    validate_records(records, "settlement.v1.json")
    latest = raw_latest(records)

    seed = latest[f"bitfinex:{SEED_INVOICE}"]
    assert seed == {
        "schema": "payhook.settlement.v1",
        "provider": "bitfinex",
        "invoice_id": SEED_INVOICE,
        "order_id": "order123",
        "state": "paid",
        "force_completed": False,
        "pay_currency": "BTC",
        "expected_amount": "0.00006262",
        "paid_amount": "0.00006262",
        "difference": "0",
        "provider_amount_diff": None,
        "discrepancy": False,
        "payments": [
            {
                "txid": "5119b4caaad1af22bebb2373995d8ecd8dfb23cc1971d0347aaa516b4e0f3e3a",
                "amount": "0.00006262",
                "currency": "BTC",
                "method": "BITCOIN",
                "confirmations": 6,
                "created_at": "2021-01-06T21:16:28Z",
                "updated_at": "2021-01-06T21:16:28Z",
                "force_completed": False,
                "crypto_amount": None,
            }
        ],
        "version": 1,
        "last_event_id": seed_id,
        "updated_at": seed["updated_at"],
    }
    # The duplicate published nothing.
    assert [r.key for r in records].count(f"bitfinex:{SEED_INVOICE}".encode()) == 1

    under = latest["bitfinex:inv-under"]
    assert (under["paid_amount"], under["difference"], under["expected_amount"]) == (
        "0.0007",
        "-0.0003",
        "0.001",
    )
    assert (under["provider_amount_diff"], under["discrepancy"]) == ("-0.0003", False)
    assert sorted(p["txid"] for p in under["payments"]) == ["u1", "u2"]

    repeat = latest["bitfinex:inv-repeat"]
    assert (repeat["paid_amount"], repeat["difference"], len(repeat["payments"])) == (
        "0.001",
        "0",
        1,
    )

    force = latest["bitfinex:inv-force"]
    assert (force["force_completed"], force["difference"]) == (True, "-0.0001")
    assert (force["provider_amount_diff"], force["discrepancy"]) == ("0.0002", True)

    exp = latest["bitfinex:inv-exp"]
    assert (exp["state"], exp["version"]) == ("paid", 1)
    assert [r.key for r in records].count(b"bitfinex:inv-exp") == 1

    steroid = msgspec.json.decode(
        json.dumps(latest["cryptosteroid:cs-inv-1"]).encode(), type=Settlement
    )
    assert (steroid.paid_amount, steroid.expected_amount, steroid.difference) == (
        Decimal("100.50"),
        Decimal("100.50"),
        Decimal(0),
    )
    assert sorted(p.txid for p in steroid.payments) == ["h1", "h2"]
    assert steroid.order_id == "order-42"

    pos = latest["cryptopos:66da1bc34f03a871430c1a71"]
    assert (pos["paid_amount"], pos["expected_amount"], pos["pay_currency"]) == (
        "0.1",
        "0.1",
        "USD",
    )
    assert pos["order_id"] == "123test"
    assert sorted(p["txid"] for p in pos["payments"]) == [
        "0xd1c7fe2821a9df5240f3d31e570a760322fa979f84c0655a8f9f857023e7064f",
        "0xsecond",
    ]
    # No customer data reached the settlements.
    text = b"".join(r.value for r in records)
    for secret in (b"alice", b"Alice", b"0x2F67f1426f33E25A920F0b2139cd460fDfb8997C"):
        assert secret not in text


async def wait_counted(consumer: Any, processed: int, duplicates: int) -> None:
    from tests.fixtures_consume import wait_for

    await wait_for(
        lambda: (
            counter(consumer, "payhook_consumer_events_total", outcome="processed") == processed
            and counter(consumer, "payhook_consumer_events_total", outcome="duplicate")
            == duplicates
        ),
        what=f"{processed} processed and {duplicates} duplicate events",
    )
