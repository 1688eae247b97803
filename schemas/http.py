"""The bodies payhook's HTTP API answers with (the requests are the provider Structs).

They describe the API in ``openapi.json``; the ingest app writes the accepted body by hand on
its hot path, and tests decode its answers with these.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# Every ``error`` code of the public contract (DESIGN.md, HTTP), and ``bad_request`` for a
# request that is not valid HTTP.
ErrorCode = Literal[
    "not_found",
    "unknown_provider",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "unauthorized",
    "rate_limited",
    "invalid_json",
    "invalid_payload",
    "order_mismatch",
    "unavailable",
    "bad_request",
]


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """The event is durable (acked by Kafka, or fsynced to the spool). A repeat of the same
    notification is accepted again with the same ``event_id``."""

    status: Literal["accepted"]
    event_id: str


class Error(msgspec.Struct, frozen=True, kw_only=True):
    """Every refusal. ``detail`` is for humans (for ``invalid_payload`` it names the field)."""

    error: ErrorCode
    detail: str


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """``/healthz`` and ``/readyz``."""

    status: Literal["ok", "ready", "unavailable", "shutting_down"]
