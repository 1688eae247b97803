"""``payhook settlement``: an invoice's stored Settlement, as the JSON published on the topic.

Reads ``PAYHOOK_STORE_URL`` read-only (beside a running consumer). ``PROVIDER INVOICE_ID``: the
current version; ``--history``: every version, oldest first; ``--order ORDER_ID``: the current
settlement of each invoice of that order. One JSON line per settlement on stdout.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Final

import asyncpg

from service.commands import CommandFailed, redacted
from service.settings import Settings
from service.state import invoice_key
from service.store import StoreError
from service.store_reader import StoreReader, open_reader

# A store that does not answer within this is reported, not waited on.
_OPEN_WITHIN: Final = 10.0


async def open_read_only(settings: Settings) -> StoreReader:
    """The store, read-only; :class:`CommandFailed` naming ``PAYHOOK_STORE_URL`` when it
    cannot be read."""
    where = redacted(settings.store_url)
    try:
        async with asyncio.timeout(_OPEN_WITHIN):
            return await open_reader(settings.store_url)
    except StoreError as exc:
        raise CommandFailed(f"{exc} (PAYHOOK_STORE_URL={where})") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc) or type(exc).__name__
        raise CommandFailed(
            f"cannot read the store at {where}: {reason} (check PAYHOOK_STORE_URL)"
        ) from None


async def _settlements(
    settings: Settings, provider: str | None, invoice_id: str | None, order_id: str | None
) -> list[bytes]:
    reader = await open_read_only(settings)
    try:
        if order_id is not None:
            return await reader.order_settlements(order_id)
        assert provider is not None
        assert invoice_id is not None
        return await reader.settlement_versions(invoice_key(provider, invoice_id))
    finally:
        await reader.close()


def run(
    settings: Settings,
    *,
    provider: str | None = None,
    invoice_id: str | None = None,
    order_id: str | None = None,
    history: bool = False,
) -> int:
    """Prints the settlements asked for; 1 (and a line on stderr) when there is none."""
    found = asyncio.run(_settlements(settings, provider, invoice_id, order_id))
    if not found:
        what = f"order {order_id!r}" if order_id is not None else f"{provider}:{invoice_id}"
        sys.stderr.write(f"payhook: no settlement for {what} in the store\n")
        return 1
    out = sys.stdout
    for data in found if history or order_id is not None else found[-1:]:
        out.write(data.decode())
        out.write("\n")
    out.flush()
    return 0
