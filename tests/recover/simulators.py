"""Local simulators of the providers' APIs that ``payhook recover`` reads.

Each is an aiohttp app that implements the documented authentication and refuses anything
else, holds invoices the test puts there, and can be told to misbehave for its next requests
(``faults``). Time is a :class:`ManualClock` shared with the client under test: the client's
pacing sleeps advance it at once, and the Bitfinex simulator stamps every request with it, so
the rate limit is measured on the simulator's clock without a test ever sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Final, Literal

import msgspec
from aiohttp import web

BITFINEX_PATH: Final = "/v2/auth/r/ext/pay/invoices"
BITFINEX_RATE: Final = 90  # requests per sliding minute, per key (seeds 000 and 003)

Fault = Literal["429", "11010", "500", "hang", "garbage", "truncated", "bad_invoice"]

# Amounts are held as Decimal and written as JSON numbers, digit for digit, as providers do.
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")


def json_answer(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_ENCODER.encode(value), status=status, content_type="application/json")


def encode(value: Any) -> bytes:
    return _ENCODER.encode(value)


class ManualClock:
    """Virtual seconds: ``sleep`` moves time forward at once instead of waiting."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self.slept = 0.0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds
            self.slept += seconds
        await asyncio.sleep(0)


def _bitfinex_error(code: int, message: str, status: int = 500) -> web.Response:
    return json_answer(["error", code, message], status=status)


async def _hang() -> web.Response:
    # Longer than any client timeout a test uses; the server's shutdown cancels it.
    await asyncio.sleep(30)
    return json_answer([])


def _faulty(fault: Fault) -> web.Response | None:
    match fault:
        case "500":
            return web.Response(status=502, text="<html>bad gateway</html>")
        case "garbage":
            return web.Response(body=b"\x00{not json", content_type="application/json")
        case "truncated":
            return web.Response(body=b'[{"id": "x", "t": 1', content_type="application/json")
    return None


@dataclass
class BitfinexSimulator:
    """``POST /v2/auth/r/ext/pay/invoices``: signed with the API key (DESIGN.md, Recovery)."""

    api_key: str
    api_secret: str
    now: Any  # () -> float: the shared clock's seconds
    invoices: list[dict[str, Any]] = field(default_factory=list)
    faults: collections.deque[Fault] = field(default_factory=collections.deque)
    seed: int = 7
    request_times: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _last_nonce: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(BITFINEX_PATH, self._list)
        return app

    def _refuse(self, why: str, code: int, message: str) -> web.Response:
        self.refused.append(why)
        return _bitfinex_error(code, message)

    def _rate_exceeded(self, at: float) -> bool:
        recent = [t for t in self.request_times if at - 60 < t <= at]
        return len(recent) > BITFINEX_RATE

    async def _list(self, request: web.Request) -> web.Response:
        at = self.now()
        self.request_times.append(at)
        body = await request.read()
        nonce = request.headers.get("bfx-nonce")
        key = request.headers.get("bfx-apikey")
        signature = request.headers.get("bfx-signature")
        if not nonce or not key or not signature:
            return self._refuse("missing headers", 10100, "apikey: invalid")
        if key != self.api_key:
            return self._refuse("unknown key", 10100, "apikey: invalid")
        expected = hmac.new(
            self.api_secret.encode(),
            f"/api{BITFINEX_PATH}{nonce}".encode() + body,
            hashlib.sha384,
        ).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return self._refuse("bad signature", 10100, "apikey: digest invalid")
        if not nonce.isdigit() or int(nonce) <= self._last_nonce:
            return self._refuse("nonce not increasing", 10114, "nonce: small")
        self._last_nonce = int(nonce)
        if request.content_type != "application/json":
            return self._refuse("content type", 10020, "request: invalid")
        if self._rate_exceeded(at):
            self.refused.append("rate")
            return _bitfinex_error(11010, "ratelimit: error", status=429)
        if self.faults:
            fault = self.faults.popleft()
            if fault == "429":
                return _bitfinex_error(11010, "ratelimit: error", status=429)
            if fault == "11010":
                return _bitfinex_error(11010, "ratelimit: error")
            if fault == "hang":
                return await _hang()
            if (answer := _faulty(fault)) is not None:
                return answer
        else:
            fault = None
        try:
            query = json.loads(body)
            start, end, limit = int(query["start"]), int(query["end"]), int(query["limit"])
        except (ValueError, KeyError, TypeError):
            return self._refuse("body", 10020, "request: invalid")
        if not 1 <= limit <= 100:
            return self._refuse("limit", 10020, "limit: invalid")
        self.bodies.append(query)
        chosen = [i for i in self.invoices if start <= i["t"] <= end]
        # The order is not documented: never rely on it.
        random.Random(self.seed + len(self.bodies)).shuffle(chosen)
        listed: list[Any] = list(chosen[:limit])
        if fault == "bad_invoice" and listed:
            listed[0] = {**listed[0], "amount": "not a number"}
        return json_answer(listed)


@dataclass
class _StatusSimulator:
    """A status API: one invoice by id, after the provider's credentials check. A subclass says
    its route, how it refuses, how it wraps an invoice and what it answers for 429 and 404."""

    route: ClassVar[str]
    too_many: ClassVar[Any]
    not_found: ClassVar[Any]
    bad_field: ClassVar[tuple[str, Any]]  # what "bad_invoice" writes into the invoice

    api_key: str
    merchant_id: str
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: collections.deque[Fault] = field(default_factory=collections.deque)
    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.route, self._get)
        return app

    def _refusal(self, request: web.Request) -> web.Response | None:
        raise NotImplementedError

    def _body(self, invoice: dict[str, Any]) -> Any:
        return invoice

    async def _get(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["invoice_id"]
        self.requests.append(invoice_id)
        if (refusal := self._refusal(request)) is not None:
            return refusal
        if self.faults:
            fault = self.faults.popleft()
            if fault == "429":
                return json_answer(self.too_many, status=429)
            if fault == "hang":
                return await _hang()
            if fault == "bad_invoice":
                name, value = self.bad_field
                return json_answer(self._body({**self.invoices.get(invoice_id, {}), name: value}))
            if (answer := _faulty(fault)) is not None:
                return answer
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            return json_answer(self.not_found, status=404)
        return json_answer(self._body(invoice))


@dataclass
class CryptoSteroidSimulator(_StatusSimulator):
    """``GET /merchants/{merchant}/invoices/{invoice_id}`` with ``X-Api-Key`` (assumed route)."""

    route: ClassVar[str] = "/merchants/{merchant}/invoices/{invoice_id}"
    too_many: ClassVar[Any] = {"message": "Too Many Requests"}
    not_found: ClassVar[Any] = {"message": "Not Found"}
    bad_field: ClassVar[tuple[str, Any]] = ("fiatAmount", "NaN?")

    def _refusal(self, request: web.Request) -> web.Response | None:
        presented = request.headers.get("X-Api-Key", "")
        if not hmac.compare_digest(presented.encode(), self.api_key.encode()):
            self.refused.append("api key")
            return json_answer({"message": "Unauthorized"}, status=401)
        if request.match_info["merchant"] != self.merchant_id:
            self.refused.append("merchant")
            return json_answer({"message": "Forbidden"}, status=403)
        return None


@dataclass
class CryptoPosSimulator(_StatusSimulator):
    """``GET /crypto/v1/status/{id}`` with ``apikey`` and ``merchantid`` headers."""

    route: ClassVar[str] = "/crypto/v1/status/{invoice_id}"
    too_many: ClassVar[Any] = {"success": False}
    not_found: ClassVar[Any] = {"success": False, "data": "invalid id"}
    bad_field: ClassVar[tuple[str, Any]] = ("total", {"not": "a number"})

    def _refusal(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("apikey", "")
        merchant = request.headers.get("merchantid", "")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()) or (
            merchant != self.merchant_id
        ):
            self.refused.append("credentials")
            return json_answer({"success": False, "data": "unauthorized"}, status=401)
        return None

    def _body(self, invoice: dict[str, Any]) -> Any:
        return {"success": True, "data": invoice}


def max_in_a_minute(times: Iterable[float]) -> int:
    """The most requests any sliding 60 s window (t-60, t] holds."""
    ordered = sorted(times)
    best = 0
    low = 0
    for high, at in enumerate(ordered):
        while ordered[low] <= at - 60:
            low += 1
        best = max(best, high - low + 1)
    return best


# --- objects the providers' APIs answer with --------------------------------------------------

WEBHOOK_TOKEN: Final = "k2.SECRET-per-order-token-never-logged"
CUSTOMER_EMAIL: Final = "jane.customer@example.com"


def bitfinex_invoice(
    index: int,
    t: int,
    status: str = "COMPLETED",
    *,
    amount_paid: str | None = None,
    order_id: str | None = None,
) -> dict[str, Any]:
    """An invoice as ``/v2/auth/r/ext/pay/invoices`` lists it: the webhook's fields plus the
    listing's own (``customerInfo``, ``webhook`` with the per-order secret, ...)."""
    order = order_id or f"order-{index}"
    btc_due = Decimal("0.00006262")
    invoice: dict[str, Any] = {
        "id": f"bfx-{index:05d}",
        "t": t,
        "type": "ECOMMERCE",
        "duration": 86399,
        "amount": Decimal("2.5"),
        "currency": "USD",
        "orderId": order,
        "payCurrencies": ["BTC", "ETH"],
        "webhook": f"https://shop.example/v1/webhooks/bitfinex/{order}?token={WEBHOOK_TOKEN}",
        "redirectUrl": "https://shop.example/thanks",
        "status": status,
        "merchantName": "Example Shop",
        "customerInfo": {
            "nationality": "DE",
            "residCountry": "DE",
            "residCity": "Berlin",
            "residZipCode": "10115",
            "residStreet": "Invalidenstr. 1",
            "fullName": "Jane Customer",
            "email": CUSTOMER_EMAIL,
            "tosAccepted": True,
        },
        "invoices": [
            {
                "amount": btc_due,
                "currency": "BTC",
                "payCurrency": "BTC",
                "poolCurrency": "BTC",
                "address": "bc1qyegkyyk656vrqp0pzyg8p4yy9xlqfhxlrg0jtf",
            },
            {
                "amount": Decimal("0.0012"),
                "currency": "ETH",
                "payCurrency": "ETH",
                "poolCurrency": "ETH",
                "address": "0x2F67f1426f33E25A920F0b2139cd460fDfb8997C",
            },
        ],
    }
    if status in {"COMPLETED", "PENDING"} or amount_paid is not None:
        invoice["payment"] = {
            "txid": f"{index:064x}",
            "amount": Decimal(amount_paid) if amount_paid else btc_due,
            "currency": "BTC",
            "method": "BITCOIN",
            "status": "COMPLETED",
            "confirmations": 6 if status == "COMPLETED" else 1,
            "created_at": "2021-01-06 21:16:28",
            "updated_at": "2021-01-06 21:16:28",
            "depositId": 1357996,
        }
    return invoice


def bitfinex_webhook_body(invoice: dict[str, Any]) -> dict[str, Any]:
    """What Bitfinex POSTs for the same invoice (seed 003): the webhook's fields only, the
    paid entry of ``invoices`` when completed, none when expired."""
    body: dict[str, Any] = {
        k: invoice[k]
        for k in ("id", "type", "orderId", "status", "amount", "currency", "t")
        if k in invoice
    }
    payment = invoice.get("payment")
    if invoice["status"] == "COMPLETED" and payment is not None:
        body["invoices"] = [
            e for e in invoice["invoices"] if e["payCurrency"] == payment["currency"]
        ]
        body["payment"] = payment
    else:
        body["invoices"] = []
    return body


def cryptosteroid_invoice(
    index: int,
    status: str,
    received: str,
    *,
    updated_at: str,
    hashes: Iterable[str] = (),
    merchant_id: str = "8f14e45f-ceea-467f-a0e6-9d5d3a7c8a10",
) -> dict[str, Any]:
    """The seed's ``Invoice`` object (001)."""
    return {
        "merchantId": merchant_id,
        "invoiceId": f"cs-{index:04d}",
        "fiatAmount": "100.00",
        "fiatCurrency": "USD",
        "description": "Order",
        "whoPayCommission": "buyer",
        "payment": {
            "method": "USDT_TRC20",
            "address": "TXYZ",
            "amount": "100.50",
            "net": "100.00",
            "fee": "0.50",
            "paid": {
                "hash": list(hashes),
                "received": received,
                "fiat": received,
                "finished": status == "PAID",
            },
        },
        "externalId": f"cs-order-{index}",
        "invoiceUrl": f"https://pay.cryptosteroid.example/{index}",
        "returnUrl": None,
        "failReturnUrl": None,
        "timeoutSeconds": 1800,
        "createdAt": "2026-11-30T10:00:00.000Z",
        "expiresAt": "2026-11-30T10:30:00.000Z",
        "updatedAt": updated_at,
        "status": status,
    }


def cryptopos_invoice(
    index: int,
    paid: Iterable[tuple[str, str, str]],
    *,
    total: str = "30",
    completed: bool = False,
) -> dict[str, Any]:
    """``data`` of ``GET /status/:id`` (seed 002); ``paid``: (tx, USD amount, timestamp)."""
    paid = list(paid)
    transactions = [
        {
            "tx": tx,
            "sender": "0x2F67f1426f33E25A920F0b2139cd460fDfb8997C",
            "amount": Decimal(amount),
            "cryptoAmount": int(Decimal(amount) * 1_000_000),
            "timestamp": stamp,
            "network": "MATIC_POLYGON",
        }
        for tx, amount, stamp in paid
    ]
    paid_total = sum((Decimal(a) for _, a, _ in paid), start=Decimal(0))
    return {
        "client": {
            "name": "Jane Customer",
            "email": CUSTOMER_EMAIL,
            "phone": "+18001234567",
            "referenceID": f"pos-order-{index}",
        },
        "paidAmount": paid_total,
        "subTotal": Decimal(total),
        "total": Decimal(total),
        "partialPaymentsEnabled": True,
        "currency": "USDC",
        "completed": completed,
        "description": "Order",
        "transactions": transactions,
        "createdAt": "2026-11-30T10:00:00.000Z",
        "merchant": {"name": "Business Name", "initiator": "POS 1"},
        "id": f"pos-{index:04d}",
    }
