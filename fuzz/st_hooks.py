"""schemathesis hooks (``SCHEMATHESIS_HOOKS=fuzz.st_hooks``): most generated requests to the
per-order routes carry that order's real secret, and many bodies name the path's order, so
generated data reaches the decoder and the normalizer instead of stopping at 401."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any

import schemathesis

from service.ingest.secrets import mint_secret
from service.settings import parse_signing_keys

_KEYS = parse_signing_keys(os.environ.get("FUZZ_SIGNING_KEYS", ""))
_CRYPTOPOS_SECRET = os.environ.get("FUZZ_CRYPTOPOS_SECRET", "").encode()
_ORDER_FIELD = {"bitfinex": "orderId", "cryptosteroid": "externalId"}


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    path: str = case.operation.path
    if path == "/v1/webhooks/cryptopos":
        return _signed(case)
    provider = path.split("/")[3] if path.startswith("/v1/webhooks/") else ""
    order_id = (case.path_parameters or {}).get("order_id")
    if provider not in _ORDER_FIELD or not isinstance(order_id, str) or not _KEYS:
        return case
    roll = zlib.crc32(order_id.encode("utf-8", "surrogatepass")) % 4
    if roll == 0:
        return case  # no secret: 401 (or 429)
    if isinstance(case.body, dict) and roll >= 2:
        case.body[_ORDER_FIELD[provider]] = order_id
    case.headers = {**(case.headers or {}), "Token": mint_secret(_KEYS, provider, order_id)}
    return case


def _signed(case: Any) -> Any:
    """Three in four Crypto POS envelopes signed over ``data`` as the client serializes it
    (``json.dumps`` with its default separators, the same text inside the envelope)."""
    body = case.body
    if not isinstance(body, dict) or "data" not in body or not _CRYPTOPOS_SECRET:
        return case
    try:
        text = json.dumps(body["data"], allow_nan=False).encode()
    except (TypeError, ValueError):
        return case
    if zlib.crc32(text) % 4:
        body["signature"] = hashlib.sha256(text + _CRYPTOPOS_SECRET).hexdigest()
    return case
