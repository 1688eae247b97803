"""``payhook send-test``: the merchant's check that a deployment accepts its providers.

Builds a realistic notification of the provider (its ``sample``: Bitfinex's webhook, with the
order's secret in the URL's ``?token=``; CryptoSteroid's invoice object, with the secret in the
``Token`` header; Crypto POS's callback, signed with the merchant secret), posts it to
``PAYHOOK_PUBLIC_URL`` exactly as the provider would, and prints the answer. Its invoice id
starts with ``payhook-test-``, so downstream can tell it from a real payment.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from datetime import UTC, datetime
from typing import Final

import aiohttp

from service.commands import CommandFailed
from service.providers import MERCHANT_SIGNED, PER_ORDER, PROVIDERS
from service.providers.samples import TEST_PREFIX, NoSample, SampleStatus
from service.settings import Settings

DEFAULT_ORDER: Final = f"{TEST_PREFIX}order"
_TIMEOUT: Final = 15.0


def request_for(
    settings: Settings,
    provider: str,
    status: SampleStatus,
    order_id: str,
    invoice_id: str,
    now: datetime,
) -> tuple[str, dict[str, str], bytes]:
    """(URL, headers, body) of the notification, as the provider would send it."""
    # Inside the command: a shared module loads a process's package only when it runs.
    from service.ingest.secrets import mint_secret, webhook_url

    try:
        body = PROVIDERS[provider].sample(status, invoice_id, order_id, now)
    except NoSample as exc:
        raise CommandFailed(str(exc), code=2) from None
    headers = {"Content-Type": "application/json"}
    per_order = PER_ORDER.get(provider)
    if per_order is not None:
        url = webhook_url(settings, provider, order_id)
        if not per_order.token_in_url:
            headers["Token"] = mint_secret(settings.signing_keys, provider, order_id)
        return url, headers, body
    signed = MERCHANT_SIGNED[provider]
    secret = signed.merchant_secret(settings)
    if secret is None:
        raise CommandFailed(f"{signed.secret_setting} is required to sign a {signed.title} test", 2)
    return f"{settings.public_url}/v1/webhooks/{provider}", headers, signed.sign(body, secret)


async def _post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, (await response.text()).strip()


def run(settings: Settings, provider: str, *, status: SampleStatus, order_id: str | None) -> int:
    """Posts one test notification; prints where, what and the answer. 0 on 200."""
    order = order_id or DEFAULT_ORDER
    invoice_id = f"{TEST_PREFIX}{secrets.token_hex(6)}"
    url, headers, body = request_for(
        settings, provider, status, order, invoice_id, datetime.now(UTC)
    )
    # The URL as printed: never the token.
    shown = url.split("?", 1)[0]
    try:
        answer_status, answer = asyncio.run(_post(url, headers, body))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise CommandFailed(
            f"cannot reach {shown}: {reason} (check PAYHOOK_PUBLIC_URL and that serve runs)"
        ) from None
    print(f"POST {shown}")
    print(f"provider {provider}, status {status}, order {order}, invoice {invoice_id}")
    print(f"{answer_status} {answer}")
    sys.stdout.flush()
    return 0 if answer_status == 200 else 1
