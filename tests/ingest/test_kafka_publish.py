"""POST a webhook to the app, then read the record back from the real broker."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient

from schemas.events import InvoiceEvent
from service.settings import Settings
from tests.fixtures_app import (
    PII,
    ClientFactory,
    bitfinex,
    cryptopos_body,
    cryptosteroid,
    encode,
    read_records,
    token_for,
)

Client = TestClient[Any, Any]
DECODER = msgspec.json.Decoder(InvoiceEvent)


async def test_bitfinex_webhook_lands_on_the_topic_and_repeats_keep_their_id(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    token = token_for(kafka_settings, "bitfinex", "order123")
    body = encode(bitfinex())  # with customerInfo
    first = await client.post(
        "/v1/webhooks/bitfinex/order123",
        data=body,
        params={"token": token},
        headers={"Content-Type": "application/json"},
    )
    assert first.status == 200
    accepted = await first.json()
    assert accepted["status"] == "accepted"

    # The same notification, formatted differently, arrives again.
    again = json.dumps(json.loads(body), indent=2, sort_keys=True).encode()
    second = await client.post(
        "/v1/webhooks/bitfinex/order123",
        data=again,
        params={"token": token},
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert second.status == 200
    assert (await second.json())["event_id"] == accepted["event_id"]

    records = await read_records(kafka_settings.kafka_bootstrap, kafka_settings.events_topic, 2)
    assert len(records) == 2
    for record in records:
        assert record.key == b"bitfinex:a6761c8b-468f-40ad-a522-cc5e41c39757"
        assert dict(record.headers) == {
            "event-id": accepted["event_id"].encode(),
            "provider": b"bitfinex",
        }
        assert record.value is not None
        for value in PII:
            assert value.encode() not in record.value
        event = DECODER.decode(record.value)
        assert event.event_id == accepted["event_id"]
        assert event.status == "completed"
        assert event.order_id == "order123"
        assert event.pay_currency == "BTC"
        wire = json.loads(record.value)
        assert wire["expected_pay_amount"] == "0.00006262"
        assert wire["payments"][0]["amount"] == "0.00006262"
        assert wire["occurred_at"] == "2021-01-06T21:16:28Z"
    # Same content, different arrival: only received_at tells them apart.
    first_event, second_event = (DECODER.decode(r.value or b"") for r in records)
    assert msgspec.structs.replace(second_event, received_at=first_event.received_at) == (
        first_event
    )


async def test_cryptosteroid_and_cryptopos_land_on_the_topic(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    token = token_for(kafka_settings, "cryptosteroid", "order-42")
    response = await client.post(
        "/v1/webhooks/cryptosteroid/order-42",
        data=encode(cryptosteroid()),
        headers={"Content-Type": "application/json", "Token": token},
    )
    assert response.status == 200
    response = await client.post(
        "/v1/webhooks/cryptopos",
        data=cryptopos_body(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200

    records = await read_records(kafka_settings.kafka_bootstrap, kafka_settings.events_topic, 2)
    by_key = {r.key: r for r in records}
    steroid = by_key[b"cryptosteroid:cs-inv-1"]
    pos = by_key[b"cryptopos:66da1bc34f03a871430c1a71"]
    assert steroid.value is not None
    assert pos.value is not None
    assert DECODER.decode(steroid.value).paid_total is not None
    assert json.loads(steroid.value)["paid_total"] == "60.25"
    assert json.loads(pos.value)["payments"][0]["amount"] == "0.09999999999999999"
    assert dict(pos.headers)["provider"] == b"cryptopos"
    for value in PII:
        assert value.encode() not in pos.value
        assert value.encode() not in steroid.value


async def test_refused_requests_leave_no_trace_in_kafka(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    headers = {"Content-Type": "application/json"}
    good = token_for(kafka_settings, "bitfinex", "order123")
    refused = [
        await client.post(
            "/v1/webhooks/bitfinex/order123", data=encode(bitfinex()), headers=headers
        ),
        await client.post(
            "/v1/webhooks/bitfinex/order123",
            data=encode(bitfinex(status="REFUNDED")),
            params={"token": good},
            headers=headers,
        ),
        await client.post(
            "/v1/webhooks/cryptopos", data=cryptopos_body(signature="0" * 64), headers=headers
        ),
    ]
    assert [r.status for r in refused] == [401, 400, 401]
    # One accepted request as a marker: it is the only record.
    marker = await client.post(
        "/v1/webhooks/bitfinex/order123",
        data=encode(bitfinex(status="EXPIRED")),
        params={"token": good},
        headers=headers,
    )
    assert marker.status == 200
    records = await read_records(kafka_settings.kafka_bootstrap, kafka_settings.events_topic, 1)
    assert [dict(r.headers)["event-id"] for r in records] == [
        (await marker.json())["event_id"].encode()
    ]
