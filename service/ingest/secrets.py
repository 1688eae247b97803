"""Who may post a notification: per-order secrets and a failure budget (a provider that signs
with a merchant secret checks that in its own module, :mod:`service.providers`).

Per-order secret = ``"{kid}." + base64url(HMAC-SHA256(key, "{provider}:{order_id}"))``, unpadded.
It is stateless (nothing stored per order) and rotatable: the first signing key mints, every
configured key verifies, selected by the ``kid`` prefix.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, final
from urllib.parse import quote

from service.providers import PER_ORDER
from service.settings import Settings, SigningKey

_WINDOW_SECONDS: Final = 60.0


@functools.lru_cache(maxsize=16)
def _keyed(key: bytes) -> hmac.HMAC:
    # Copying a keyed HMAC skips the key schedule (and OpenSSL's digest lookup) per request.
    return hmac.new(key, digestmod=hashlib.sha256)


def _digest(key: bytes, provider: str, order_id: str) -> str:
    mac = _keyed(key).copy()
    mac.update(f"{provider}:{order_id}".encode())
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")


def _mint(key: SigningKey, provider: str, order_id: str) -> str:
    return f"{key.kid}.{_digest(key.key.reveal(), provider, order_id)}"


def mint_secret(keys: Sequence[SigningKey], provider: str, order_id: str) -> str:
    """The secret for one order, minted with the first (current) key."""
    if not keys:
        raise ValueError("no signing key configured")
    return _mint(keys[0], provider, order_id)


def verify_secret(keys: Sequence[SigningKey], provider: str, order_id: str, presented: str) -> bool:
    """True only for the exact string some configured key mints; compared in constant time."""
    kid, sep, _ = presented.partition(".")
    if not sep:
        return False
    for key in keys:
        if key.kid == kid:
            expected = _mint(key, provider, order_id)
            # Encoded first: compare_digest refuses non-ASCII str, and a client may send any.
            return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "replace"))
    return False


def webhook_url(settings: Settings, provider: str, order_id: str) -> str:
    """The URL to register on the provider's invoice. A provider that sends no header (Bitfinex)
    gets the token in the query string; the others return the secret in a ``Token`` header."""
    per_order = PER_ORDER.get(provider)
    if per_order is None:
        raise ValueError(f"{provider} has no per-order webhook URL")
    url = f"{settings.public_url}/v1/webhooks/{provider}/{quote(order_id, safe='')}"
    if per_order.token_in_url:
        secret = mint_secret(settings.signing_keys, provider, order_id)
        url += f"?token={quote(secret, safe='')}"
    return url


@final
class FailureLimiter:
    """Failed authentications per source address in a sliding minute.

    Each address keeps only its latest ``budget`` failure times: the budget is spent exactly
    when the oldest of those is still inside the window, so memory per address is bounded even
    under a flood (refused requests count too).
    """

    __slots__ = ("_budget", "_clock", "_failures", "_since_sweep")

    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._budget = budget
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._since_sweep = 0

    def fail(self, address: str) -> bool:
        """Records one failed authentication; True when it is past the budget (answer 429)."""
        now = self._clock()
        self._sweep(now)
        if self._budget <= 0:
            return True
        times = self._failures.get(address)
        if times is None:
            times = self._failures[address] = deque(maxlen=self._budget)
        limited = len(times) == self._budget and now - times[0] < _WINDOW_SECONDS
        times.append(now)
        return limited

    def __len__(self) -> int:
        return len(self._failures)

    def _sweep(self, now: float) -> None:
        # Forget addresses idle for a whole window, now and then, so the map cannot grow
        # without bound across many addresses.
        self._since_sweep += 1
        if self._since_sweep < 1024:
            return
        self._since_sweep = 0
        stale = [a for a, t in self._failures.items() if now - t[-1] >= _WINDOW_SECONDS]
        for address in stale:
            del self._failures[address]
