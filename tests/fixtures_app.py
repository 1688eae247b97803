"""Provider bodies as the providers send them, and HTTP clients of the ingest app.

``SEED_003`` is the Bitfinex example of ``shared/seeds/003`` byte for byte (whitespace
included). Customer data is planted in the other examples so tests can prove it never leaves.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.ingest.app import create_app
from service.ingest.secrets import mint_secret
from service.ingest.server import IngestRunner
from service.providers.cryptopos import signature as cryptopos_signature
from service.settings import Settings
from tests.fixtures_kafka import SettingsFactory

SEED_003 = (
    b'{ "id": "a6761c8b-468f-40ad-a522-cc5e41c39757", "type": "ECOMMERCE", "orderId": '
    b'"order123", "status": "COMPLETED", "amount": 2.5, "currency": "USD", "t": 1612460165497, '
    b'"invoices": [ { "amount": 0.00006262, "currency": "BTC", "payCurrency": "BTC", '
    b'"poolCurrency": "BTC", "address": "bc1qyegkyyk656vrqp0pzyg8p4yy9xlqfhxlrg0jtf" } ], '
    b'"payment": { "txid": "5119b4caaad1af22bebb2373995d8ecd8dfb23cc1971d0347aaa516b4e0f3e3a", '
    b'"amount": 0.00006262, "currency": "BTC", "method": "BITCOIN", "status": "COMPLETED", '
    b'"confirmations": 6, "created_at": "2021-01-06 21:16:28", "updated_at": '
    b'"2021-01-06 21:16:28", "depositId": 1357996 } }'
)
SEED_003_ORDER = "order123"

# Personal data a provider may send; none of it may reach Kafka or a log line.
PII = (
    "Alice Example",
    "alice@example.com",
    "+18001234567",
    "1 Main Street",
    "203.0.113.7",
    "0x2F67f1426f33E25A920F0b2139cd460fDfb8997C",
)

CRYPTOPOS_SECRET = b"cryptopos-merchant-secret"  # as in fixtures_kafka.TEST_ENV


def bitfinex(**overrides: Any) -> dict[str, Any]:
    """Seed 003 as a dict, with the customer data Bitfinex keeps on the invoice."""
    body: dict[str, Any] = json.loads(SEED_003)
    body["customerInfo"] = {
        "fullName": PII[0],
        "email": PII[1],
        "residStreet": PII[3],
        "ip": PII[4],
    }
    body.update(overrides)
    return body


def cryptosteroid(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "merchantId": "0f6c2a5e-9d1b-4c1e-8d5a-2b9e5f3c7a11",
        "invoiceId": "cs-inv-1",
        "fiatAmount": "100.00",
        "fiatCurrency": "USD",
        "description": "Order 42",
        "whoPayCommission": "buyer",
        "payment": {
            "method": "USDT_TRC20",
            "address": "TXYZ1234",
            "amount": "100.50",
            "net": "100.00",
            "fee": "0.50",
            "paid": {"hash": ["h1", "h2"], "received": "60.25", "fiat": 60, "finished": False},
        },
        "externalId": "order-42",
        "invoiceUrl": "https://pay.example/cs-inv-1",
        "returnUrl": None,
        "failReturnUrl": None,
        "processingUrl": "https://merchant.example/hook",
        "timeoutSeconds": 1800,
        "createdAt": "2024-05-01T10:00:00.000Z",
        "expiresAt": "2024-05-01T10:30:00.000Z",
        "updatedAt": "2024-05-01T10:05:00.000Z",
        "status": "WAITING",
    }
    body.update(overrides)
    return body


def cryptopos_data(**overrides: Any) -> dict[str, Any]:
    """Seed 002's ``data``, with the client's personal data as the provider sends it."""
    data: dict[str, Any] = {
        "client": {"name": PII[0], "email": PII[1], "phone": PII[2], "referenceID": "123test"},
        "paidAmount": 0.1,
        "subTotal": 0.1,
        "total": 0.1,
        "partialPaymentsEnabled": False,
        "currency": "USDC",
        "completed": True,
        "description": "Optional Order Description",
        "transactions": [
            {
                "tx": "0xd1c7fe2821a9df5240f3d31e570a760322fa979f84c0655a8f9f857023e7064f",
                "sender": PII[5],
                "amount": 0.09999999999999999,
                "cryptoAmount": 100000,
                "timestamp": "2024-09-05T21:00:27.000Z",
                "network": "MATIC_POLYGON",
            }
        ],
        "createdAt": "2024-09-05T20:59:47.429Z",
        "merchant": {"name": "Business Name", "initiator": "Internal Test POS API 1"},
        "id": "66da1bc34f03a871430c1a71",
    }
    data.update(overrides)
    return data


def cryptopos_body(
    data: dict[str, Any] | None = None,
    *,
    secret: bytes = CRYPTOPOS_SECRET,
    indent: int | None = 2,
    signature: str | None = None,
) -> bytes:
    """The callback envelope, signed over the exact text of ``data`` as it is embedded."""
    data_text = json.dumps(cryptopos_data() if data is None else data, indent=indent).encode()
    sig = cryptopos_signature(data_text, secret) if signature is None else signature
    return b'{"signature": "' + sig.encode() + b'", "data": ' + data_text + b"}"


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(copy.deepcopy(body)).encode()


def token_for(settings: Settings, provider: str, order_id: str) -> str:
    return mint_secret(settings.signing_keys, provider, order_id)


ClientFactory = Callable[[Settings], Awaitable[TestClient[Any, Any]]]


class IngestTestServer(TestServer):
    """aiohttp's TestServer on 127.0.0.1 with the runner ``payhook serve`` uses, configured
    as serve configures it (TestServer cancels a handler whose client left; serve does not)."""

    def __init__(self, app: web.Application) -> None:
        super().__init__(app, host="127.0.0.1")

    async def _make_runner(self, **kwargs: Any) -> IngestRunner:
        kwargs["handler_cancellation"] = False
        return IngestRunner(self.app, **kwargs)


@pytest.fixture
async def app_client() -> AsyncIterator[ClientFactory]:
    """Starts the app for given settings on 127.0.0.1 and a free port; closes it after."""
    clients: list[TestClient[Any, Any]] = []

    async def make(settings: Settings) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(IngestTestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def offline_settings(settings_factory: SettingsFactory, unreachable: str) -> Settings:
    """Settings whose Kafka is a port nobody listens on and whose spool has no room: every
    publish is Unavailable (503), which proves a request passed every earlier check."""
    return settings_factory(kafka_bootstrap=unreachable, publish_timeout=0.5, spool_max_bytes=1)


@pytest.fixture
async def offline_client(
    app_client: ClientFactory, offline_settings: Settings
) -> TestClient[Any, Any]:
    return await app_client(offline_settings)


async def read_records(
    bootstrap: str, topic: str, count: int, within: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Reads the first ``count`` records of every partition of ``topic`` (no group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(within):
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
            assert partitions, f"topic {topic} does not exist"
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
            await consumer.seek_to_beginning()
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


def replace(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)
