"""Crypto POS recovery: re-read one invoice from ``GET {url}/crypto/v1/status/{id}``.

Headers ``apikey`` and ``merchantid``; the answer is ``{"success": true, "data": {...}}`` with
``data`` the object the callbacks carry (seed 002), decoded and normalized by the callback's own
code. ``success: false`` is an error for that invoice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final, final
from urllib.parse import quote

import aiohttp
import msgspec

from schemas.events import InvoiceEvent
from service.errors import PayhookError
from service.providers.cryptopos import CRYPTOPOS
from service.recover.api import (
    ApiError,
    Clock,
    CredentialsRejected,
    InvoiceUnavailable,
    RateLimited,
    RetryPolicy,
    Unavailable,
    Undecodable,
    request,
    retry_after,
    with_retries,
)
from service.settings import Secret

PROVIDER: Final = "cryptopos"
SETTINGS: Final = "PAYHOOK_CRYPTOPOS_API_KEY and PAYHOOK_CRYPTOPOS_MERCHANT_ID"


class _Answer(msgspec.Struct):
    success: bool
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_ANSWER: Final = msgspec.json.Decoder(_Answer)


def to_event(body: bytes, invoice_id: str, received_at: datetime) -> InvoiceEvent:
    """``data`` through the callback's decoder and normalization."""
    try:
        answer = _ANSWER.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise Undecodable(PROVIDER, "answer is not {success, data}") from None
    if not answer.success:
        raise InvoiceUnavailable(PROVIDER, "the provider answered success: false")
    try:
        data = CRYPTOPOS.decode(bytes(answer.data))
        if data.id != invoice_id:
            raise Undecodable(PROVIDER, "the answer is about another invoice")
        return CRYPTOPOS.normalize(data, received_at, "recovery")
    except PayhookError as exc:
        raise Undecodable(PROVIDER, exc.detail[:200]) from None
    except RecursionError:
        raise Undecodable(PROVIDER, "JSON is nested too deeply") from None


@final
class CryptoPosApi:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        url: str,
        key: Secret,
        merchant_id: str,
        clock: Clock,
        policy: RetryPolicy,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self._base = f"{url.rstrip('/')}/crypto/v1/status/"
        self._key = key
        self._merchant_id = merchant_id
        self._clock = clock
        self._policy = policy
        self._on_request = on_request or (lambda outcome: None)

    async def fetch(self, invoice_id: str, received_at: datetime) -> InvoiceEvent:
        """The invoice as the provider holds it now, retried while unavailable or malformed."""

        async def once() -> InvoiceEvent:
            body = await self._get(invoice_id)
            try:
                return to_event(body, invoice_id, received_at)
            except Undecodable:
                self._on_request("undecodable")
                raise

        return await with_retries(
            once, self._policy, self._clock, lambda exc: self._on_request("retry")
        )

    async def _get(self, invoice_id: str) -> bytes:
        try:
            status, headers, body = await request(
                PROVIDER,
                self._session,
                "GET",
                self._base + quote(invoice_id, safe=""),
                headers={
                    "apikey": self._key.reveal().decode(),
                    "merchantid": self._merchant_id,
                    "Accept": "application/json",
                },
                timeout=self._policy.timeout,
            )
        except ApiError:
            self._on_request("unavailable")
            raise
        if status == 200:
            self._on_request("ok")
            return body
        if status in (401, 403):
            self._on_request("refused")
            raise CredentialsRejected(PROVIDER, f"HTTP {status}: check {SETTINGS}")
        if status == 429:
            self._on_request("rate_limited")
            raise RateLimited(PROVIDER, "rate limited", retry_after(headers))
        if status == 404:
            self._on_request("not_found")
            raise InvoiceUnavailable(PROVIDER, "the provider does not know this invoice (404)")
        self._on_request("unavailable")
        raise Unavailable(PROVIDER, f"HTTP {status}")
