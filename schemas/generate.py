"""Writes the JSON Schema files of the published events from the Structs.

``python -m schemas.generate`` rewrites them; ``tests/test_schemas.py`` fails when they are stale.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from schemas.events import InvoiceEvent, Settlement

HERE = Path(__file__).parent

FILES: dict[str, type[msgspec.Struct]] = {
    "invoice-event.v1.json": InvoiceEvent,
    "settlement.v1.json": Settlement,
}


def render(struct: type[msgspec.Struct]) -> bytes:
    schema = msgspec.json.schema(struct)
    return msgspec.json.format(msgspec.json.encode(schema), indent=2) + b"\n"


def main() -> None:
    for name, struct in FILES.items():
        (HERE / name).write_bytes(render(struct))


if __name__ == "__main__":
    main()
