"""What every provider's ``sample`` shares: the statuses a test notification can have, and how
its JSON is written (amounts as the JSON numbers or strings each provider sends, from
``Decimal``, never through ``float``).

``payhook send-test`` posts these samples to a deployment; their invoice ids start with
``payhook-test-`` so downstream can tell test traffic from real payments.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

SampleStatus = Literal["completed", "expired", "partial"]
SAMPLE_STATUSES: Final[tuple[SampleStatus, ...]] = ("completed", "expired", "partial")
TEST_PREFIX: Final = "payhook-test-"

# Decimal amounts become JSON numbers, as Bitfinex and Crypto POS send them.
_NUMBERS: Final = msgspec.json.Encoder(decimal_format="number")


class NoSample(ValueError):
    """The provider never sends a notification of that status; the message says so."""


def sample_json(body: dict[str, Any]) -> bytes:
    return _NUMBERS.encode(body)


def iso_millis(moment: datetime) -> str:
    """``2024-05-01T10:00:00.000Z``, as CryptoSteroid and Crypto POS write times."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )
