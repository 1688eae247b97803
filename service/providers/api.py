"""What every provider API client of the recovery sweep shares: errors, retries, pacing, time.

A provider's answer is one of: read whole (the caller gets decoded objects), transiently
unavailable (a 5xx, a timeout, a connection error, a malformed body: retried with backoff a
bounded number of times), rate limited (backed off, retried), or refused for good (wrong
credentials: reported at once, naming the settings to check; an unknown invoice). Error
messages never carry a secret, a header, or a body: only the provider, what happened and, for
credentials, the names of the settings.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Protocol, TypeVar, final
from urllib.parse import quote

import aiohttp

from schemas.events import InvoiceEvent
from service.errors import PayhookError

T = TypeVar("T")

# A listing of 100 invoices is a few hundred KiB at most; anything far larger is not an answer.
MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024


class Clock(Protocol):
    """Monotonic seconds and a way to wait; tests pass a virtual clock shared with the
    provider simulator, so pacing is measured without real sleeping."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


@final
class LoopClock:
    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ApiError(Exception):
    """A provider API did not give what was asked; ``reason`` is safe to log."""

    retryable: bool = False

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


class Unavailable(ApiError):
    """A 5xx, a timeout, a connection failure or a malformed answer: may pass."""

    retryable = True


class Undecodable(Unavailable):
    """An answer (or one object in it) that does not decode or normalize."""


class RateLimited(ApiError):
    retryable = True

    def __init__(self, provider: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(provider, reason)
        self.retry_after = retry_after


class CredentialsRejected(ApiError):
    """The provider refuses our credentials: nothing will work until the settings change."""


class InvoiceUnavailable(ApiError):
    """The provider will not answer for this one invoice (unknown, ``success: false``)."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, exponential backoff with jitter between
    them; a rate limit waits ``rate_limit_delay`` (or the provider's ``Retry-After``)."""

    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 30.0
    rate_limit_delay: float = 60.0
    timeout: float = 15.0

    def backoff(self, attempt: int) -> float:
        ceiling: float = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def pause(self, exc: ApiError, attempt: int) -> float:
        """How long to wait after ``attempt`` failed with ``exc``."""
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after
        if isinstance(exc, RateLimited):
            return self.rate_limit_delay
        return self.backoff(attempt)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    clock: Clock,
    on_retry: Callable[[ApiError], None] | None = None,
) -> T:
    """``call()`` until it succeeds, a non-retryable error, or ``policy.attempts`` tries."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except ApiError as exc:
            if not exc.retryable or attempt == policy.attempts:
                raise
            if on_retry is not None:
                on_retry(exc)
            await clock.sleep(policy.pause(exc, attempt))
    raise AssertionError("unreachable")


@final
class Pacer:
    """At most ``limit`` request starts in any sliding ``period``, on ``clock``."""

    __slots__ = ("_clock", "_limit", "_period", "_starts")

    def __init__(self, clock: Clock, limit: int, period: float = 60.0) -> None:
        self._clock = clock
        self._limit = limit
        self._period = period
        self._starts: collections.deque[float] = collections.deque()

    async def wait(self) -> None:
        while True:
            now = self._clock.now()
            while self._starts and self._starts[0] <= now - self._period:
                self._starts.popleft()
            if len(self._starts) < self._limit:
                self._starts.append(now)
                return
            await self._clock.sleep(self._starts[0] + self._period - now)


def retry_after(headers: collections.abc.Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After", "")
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if 0 < seconds <= 3600 else None


async def read_answer(provider: str, response: aiohttp.ClientResponse) -> bytes:
    """The whole body, refusing one beyond :data:`MAX_ANSWER_BYTES`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise Unavailable(provider, f"answer larger than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def request(
    provider: str,
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    timeout: float,  # noqa: ASYNC109 - aiohttp's own per-request timeout, named as it names it
    data: bytes | None = None,
) -> tuple[int, collections.abc.Mapping[str, str], bytes]:
    """One HTTP exchange: (status, headers, body). A timeout or a connection failure is
    :class:`Unavailable`, named by its kind only (never the URL or the headers)."""
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            body = await read_answer(provider, response)
            return response.status, response.headers, body
    except TimeoutError:
        raise Unavailable(provider, f"no answer within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise Unavailable(provider, f"connection failed ({type(exc).__name__})") from None


def _ignore(outcome: str) -> None:
    pass


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusEndpoint:
    """Where and how one provider's status API is read: ``GET {base}{invoice_id}`` with
    ``headers``; the answer through ``to_event``, the provider's own decoder and normalization
    (a :class:`~service.errors.PayhookError` it raises makes the answer :class:`Undecodable`).
    ``settings`` names the credentials' settings, for the error that refuses them."""

    provider: str
    settings: str
    base: str
    headers: dict[str, str] = field(repr=False)  # they carry the API key
    to_event: Callable[[bytes, str, datetime], InvoiceEvent]


@final
class StatusApi:
    """One invoice read back from a status API (CryptoSteroid, Crypto POS), retried while it is
    unavailable, rate limited or malformed. ``on_request`` counts each request's outcome."""

    __slots__ = ("_clock", "_endpoint", "_on_request", "_policy", "_session")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: StatusEndpoint,
        *,
        clock: Clock,
        policy: RetryPolicy,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self._endpoint = endpoint
        self._clock = clock
        self._policy = policy
        self._on_request = on_request or _ignore

    async def fetch(self, invoice_id: str, received_at: datetime) -> InvoiceEvent:
        """The invoice as the provider holds it now, retried while unavailable or malformed."""

        async def once() -> InvoiceEvent:
            body = await self._get(invoice_id)
            try:
                return self._endpoint.to_event(body, invoice_id, received_at)
            except Undecodable:
                self._on_request("undecodable")
                raise
            except PayhookError as exc:
                reason = exc.detail[:200]
            except RecursionError:
                reason = "JSON is nested too deeply"
            self._on_request("undecodable")
            raise Undecodable(self._endpoint.provider, reason) from None

        return await with_retries(
            once, self._policy, self._clock, lambda exc: self._on_request("retry")
        )

    async def _get(self, invoice_id: str) -> bytes:
        endpoint = self._endpoint
        provider = endpoint.provider
        try:
            status, headers, body = await request(
                provider,
                self._session,
                "GET",
                endpoint.base + quote(invoice_id, safe=""),
                headers=endpoint.headers,
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
            raise CredentialsRejected(provider, f"HTTP {status}: check {endpoint.settings}")
        if status == 429:
            self._on_request("rate_limited")
            raise RateLimited(provider, "rate limited", retry_after(headers))
        if status == 404:
            self._on_request("not_found")
            raise InvoiceUnavailable(provider, "the provider does not know this invoice (404)")
        self._on_request("unavailable")
        raise Unavailable(provider, f"HTTP {status}")
