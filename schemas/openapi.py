"""The OpenAPI 3.1 description of payhook's HTTP API, built from the Structs.

Request bodies are the provider notification Structs, response bodies the Structs of
``schemas.http``, all as msgspec's schema components. ``schemas.generate`` writes it to
``openapi.json``.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from schemas.amounts import PROVIDER_DECIMAL
from schemas.generate import Node, replace_decimals
from schemas.http import Accepted, Error, Probe
from schemas.providers import (
    BitfinexWebhook,
    CryptoPosCallback,
    CryptoPosInvoice,
    CryptoSteroidInvoice,
)

VERSION: Final = "0.1.0"


_REF: Final = "#/components/schemas/{name}"


def provider_decimal() -> Node:
    return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": PROVIDER_DECIMAL}]}


# status -> (description, the error codes it carries)
_ERRORS: Final[dict[int, tuple[str, tuple[str, ...]]]] = {
    400: (
        "The body is not JSON (`invalid_json`), does not match the provider's notification "
        "(`invalid_payload`, the detail names the field path), or names another order than the "
        "URL (`order_mismatch`); `bad_request` for a request that is not valid HTTP.",
        ("invalid_json", "invalid_payload", "order_mismatch", "bad_request"),
    ),
    401: ("A missing, malformed or wrong secret or signature, all alike.", ("unauthorized",)),
    404: (
        "No such route (`not_found`) or no such provider (`unknown_provider`; also Crypto POS "
        "while `PAYHOOK_CRYPTOPOS_SECRET` is not set).",
        ("not_found", "unknown_provider"),
    ),
    405: ("Another method than the route's.", ("method_not_allowed",)),
    413: ("The body exceeds `PAYHOOK_MAX_BODY_BYTES` (64 KiB).", ("payload_too_large",)),
    415: (
        "The body is not `application/json` (a charset is allowed).",
        ("unsupported_media_type",),
    ),
    429: (
        "The source address is past its budget of failed authentications "
        "(`PAYHOOK_AUTH_FAILURE_BUDGET` in a sliding minute): answered in 401's place.",
        ("rate_limited",),
    ),
    503: (
        "The event cannot be made durable now (Kafka does not ack and the spool is full).",
        ("unavailable",),
    ),
}

_WEBHOOK_STATUSES: Final = (400, 401, 404, 405, 413, 415, 429, 503)


def _error_response(status: int) -> Node:
    description, codes = _ERRORS[status]
    schema: Node = {
        "allOf": [
            {"$ref": _REF.format(name="Error")},
            {"type": "object", "properties": {"error": {"enum": list(codes)}}},
        ]
    }
    response: Node = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    elif status == 405:
        response["headers"] = {"Allow": {"$ref": "#/components/headers/Allow"}}
    return response


def _json_body(name: str) -> Node:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _webhook(summary: str, description: str, body: str, security: list[Node]) -> Node:
    responses: Node = {
        "200": {
            "description": "The event is durable; the same notification again gets the same "
            "`event_id`.",
            "content": _json_body("Accepted"),
        }
    }
    for status in _WEBHOOK_STATUSES:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return {
        "post": {
            "summary": summary,
            "description": description,
            "operationId": f"webhook_{body}",
            "security": security,
            "requestBody": {"required": True, "content": _json_body(body)},
            "responses": responses,
        }
    }


_ORDER_ID: Final[Node] = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "description": "The merchant's order id; the body must name the same order.",
    "schema": {"type": "string", "minLength": 1},
}


def _probe(operation: str, summary: str, statuses: dict[str, str]) -> Node:
    return {
        "get": {
            "summary": summary,
            "operationId": operation,
            "security": [],
            "responses": {
                **{
                    status: {"description": text, "content": _json_body("Probe")}
                    for status, text in statuses.items()
                },
                "405": {"$ref": "#/components/responses/E405"},
            },
        }
    }


def _components() -> Node:
    _, schemas = msgspec.json.schema_components(
        [BitfinexWebhook, CryptoSteroidInvoice, CryptoPosCallback, Accepted, Error, Probe],
        ref_template=_REF,
    )
    # The envelope keeps ``data`` as raw bytes for the signature; it holds a CryptoPosInvoice.
    _, invoice = msgspec.json.schema_components([CryptoPosInvoice], ref_template=_REF)
    schemas.update(invoice)
    envelope = schemas["CryptoPosCallback"]["properties"]
    envelope["data"] = {"$ref": _REF.format(name="CryptoPosInvoice")}
    envelope["signature"] = {
        "type": "string",
        "description": "Hex SHA-256 of the exact bytes of `data` followed by the merchant "
        "secret (compared case-insensitively).",
    }
    # Provider amounts are numbers or numeric strings; the responses hold no amounts.
    return {
        "schemas": {name: replace_decimals(schemas[name], provider_decimal) for name in schemas},
        "responses": {f"E{status}": _error_response(status) for status in _ERRORS},
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 0},
            },
            "Allow": {"description": "The route's methods.", "schema": {"type": "string"}},
        },
        "securitySchemes": {
            "tokenHeader": {
                "type": "apiKey",
                "in": "header",
                "name": "Token",
                "description": "The per-order secret `payhook secret` mints (CryptoSteroid "
                "returns it in this header).",
            },
            "tokenQuery": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "The per-order secret in the webhook URL (Bitfinex sends no "
                "header).",
            },
        },
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI document."""
    per_order: list[Node] = [{"tokenHeader": []}, {"tokenQuery": []}]
    per_order_text = (
        "Authenticated by the order's secret (the `Token` header or the `token` query "
        "parameter) before the body is read. "
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "payhook",
            "version": VERSION,
            "description": "Webhook ingestion for crypto payment providers. A request with "
            "several faults is answered by the first of 404, 405, 413, 415, 401 (429), 400. "
            'Every error body is `{"error": CODE, "detail": "..."}`; no client input '
            "gets a 5xx other than 503.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": {
            "/v1/webhooks/bitfinex/{order_id}": {
                "parameters": [_ORDER_ID],
                **_webhook(
                    "A Bitfinex Pay webhook",
                    per_order_text + "`orderId` must equal the path's order id.",
                    "BitfinexWebhook",
                    per_order,
                ),
            },
            "/v1/webhooks/cryptosteroid/{order_id}": {
                "parameters": [_ORDER_ID],
                **_webhook(
                    "A CryptoSteroid invoice notification",
                    per_order_text + "`externalId` must equal the path's order id.",
                    "CryptoSteroidInvoice",
                    per_order,
                ),
            },
            "/v1/webhooks/cryptopos": _webhook(
                "A Crypto POS callback",
                "One URL per merchant, authenticated by the `signature` inside the body (401 "
                "when wrong or missing); a body that is not JSON is 400 `invalid_json`. 404 "
                "`unknown_provider` while `PAYHOOK_CRYPTOPOS_SECRET` is not set.",
                "CryptoPosCallback",
                [],
            ),
            "/healthz": _probe("healthz", "The process is alive", {"200": "Alive."}),
            "/readyz": _probe(
                "readyz",
                "The service can accept: Kafka reachable, or the spool has room",
                {"200": "Ready.", "503": "Unavailable, or shutting down."},
            ),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "405": {"$ref": "#/components/responses/E405"},
                    },
                }
            },
        },
        "components": _components(),
    }
