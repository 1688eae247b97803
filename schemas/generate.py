"""Writes the JSON Schema files of the published events and the OpenAPI description of the HTTP
API, all from the Structs.

``python -m schemas.generate`` rewrites them; ``tests/test_schemas.py`` fails when they are stale.

msgspec describes a ``Decimal`` as ``{"type": "string", "format": "decimal"}``: ``decimal`` is
no standard format, so ajv refuses to compile it and other validators ignore it (accepting
``"not a number"``). The published amounts are plain decimal strings, so each such node becomes
a ``pattern`` any validator applies; provider amounts (a JSON number or a numeric string) get
their own description in the OpenAPI document (``schemas.openapi``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas.events import InvoiceEvent, Settlement

HERE: Final = Path(__file__).parent
DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
# The identifiers name the documents; nothing is fetched from them.
ID_BASE: Final = "urn:payhook:schema:"

# A published amount: an optional minus, digits, an optional fraction; never an exponent.
# [0-9], not \d: Python's \d matches every script's digits.
PLAIN_DECIMAL: Final = r"^-?[0-9]+(\.[0-9]+)?$"

Node = dict[str, Any]


def replace_decimals(node: Any, make: Callable[[], Node]) -> Any:
    """``node`` with every ``format: decimal`` string schema replaced by ``make()``."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            return make()
        return {key: replace_decimals(value, make) for key, value in node.items()}
    if isinstance(node, list):
        return [replace_decimals(value, make) for value in node]
    return node


def plain_decimal() -> Node:
    return {"type": "string", "pattern": PLAIN_DECIMAL}


def event_schema(struct: type[msgspec.Struct], name: str) -> Node:
    """The draft 2020-12 JSON Schema of one published event."""
    body = replace_decimals(msgspec.json.schema(struct), plain_decimal)
    return {"$schema": DRAFT, "$id": ID_BASE + name.removesuffix(".json"), **body}


def dump(document: Node) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


def _render_event(name: str, struct: type[msgspec.Struct]) -> Callable[[], bytes]:
    return lambda: dump(event_schema(struct, name))


def _render_openapi() -> bytes:
    from schemas.openapi import openapi  # imports this module's helpers

    return dump(openapi())


EVENT_FILES: Final[dict[str, type[msgspec.Struct]]] = {
    "invoice-event.v1.json": InvoiceEvent,
    "settlement.v1.json": Settlement,
}

# Every generated file and how it is rendered.
FILES: Final[dict[str, Callable[[], bytes]]] = {
    **{name: _render_event(name, struct) for name, struct in EVENT_FILES.items()},
    "openapi.json": _render_openapi,
}


def main() -> None:
    for name, render in FILES.items():
        (HERE / name).write_bytes(render())


if __name__ == "__main__":
    main()
