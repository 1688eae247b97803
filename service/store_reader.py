"""Reading the consumer's store without writing to it: what ``payhook recover`` and
``payhook settlement`` need.

The consumer owns the store: it creates and migrates the schema and, on SQLite, holds an
exclusive lock. A reader opens it read-only (SQLite ``mode=ro``, beside the running consumer
thanks to WAL), never migrates, and refuses a schema other than this release's with a message
that says what to do, rather than reading rows it may misunderstand.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol, final
from urllib.parse import quote

import asyncpg
import msgspec

from service.state import InvoiceState
from service.store import SCHEMA_VERSION, StoreError

_state_decoder: Final = msgspec.json.Decoder(InvoiceState)


class StoreOutdated(StoreError):
    """The store's schema is not this release's: ``payhook consume`` migrates it."""


def _check_version(version: int | None) -> None:
    if version is None or version < SCHEMA_VERSION:
        raise StoreOutdated(
            f"the store's schema is version {version or 0}, this release needs "
            f"{SCHEMA_VERSION}: start `payhook consume` of this release once to migrate it"
        )
    if version > SCHEMA_VERSION:
        raise StoreOutdated(
            f"the store's schema is version {version}, newer than this release's "
            f"{SCHEMA_VERSION}: run `payhook recover` of the same release as `payhook consume`"
        )


def _event_ids(data: bytes) -> frozenset[str]:
    return frozenset(fact.event_id for fact in _state_decoder.decode(data).facts)


def _updated_since(data: bytes, since: datetime) -> bool:
    updated: datetime = _state_decoder.decode(data).settlement.updated_at
    return updated >= since


class StoreReader(Protocol):
    async def processed_event_ids(self, keys: Collection[str]) -> dict[str, frozenset[str]]:
        """The event ids applied to each invoice key the store holds (absent: never seen)."""
        ...

    async def refreshable(
        self, provider: str, states: Collection[str], since: datetime
    ) -> list[str]:
        """Invoice ids of ``provider`` whose settlement is in one of ``states`` and was
        updated at or after ``since``."""
        ...

    async def settlement_versions(self, key: str) -> list[bytes]:
        """Every stored version of an invoice's settlement (the JSON published), oldest first."""
        ...

    async def order_settlements(self, order_id: str) -> list[bytes]:
        """The current settlement of every invoice of an order, by invoice key."""
        ...

    async def close(self) -> None: ...


_VERSIONS: Final = "SELECT data FROM settlements WHERE key = {p1} ORDER BY version"
_ORDER: Final = (
    "SELECT s.data FROM invoices i JOIN settlements s ON s.key = i.key AND s.version = i.version "
    "WHERE i.order_id = {p1} ORDER BY i.key"
)


async def open_reader(url: str) -> StoreReader:
    """Opens the store named by ``PAYHOOK_STORE_URL`` read-only. Raises :class:`StoreError`
    (or :class:`StoreOutdated`) with a message for the operator."""
    if url.startswith("sqlite:///"):
        return await SqliteReader.open(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresReader.open(url)
    raise StoreError("store URL must start with sqlite:/// or postgresql://")


@final
class SqliteReader:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="payhook-reader")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteReader:
        reader = cls(path)
        try:
            await reader._run(reader._open)
        except BaseException:
            await reader.close()
            raise
        return reader

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        if not self._path.exists():
            raise StoreError(f"no store at {self._path}: start `payhook consume` first")
        uri = f"file:{quote(str(self._path.resolve()))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self._path} read-only: {exc}") from None
        self._db = db
        try:
            row = db.execute("SELECT max(version) FROM payhook_schema").fetchone()
        except sqlite3.OperationalError:
            row = None
        _check_version(row[0] if row else None)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is closed")
        return self._db

    async def processed_event_ids(self, keys: Collection[str]) -> dict[str, frozenset[str]]:
        rows = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT key, data FROM invoices WHERE key IN (SELECT value FROM json_each(?))",
                    (msgspec.json.encode(list(keys)),),
                )
                .fetchall()
            )
        )
        return {key: _event_ids(data) for key, data in rows if data is not None}

    async def refreshable(
        self, provider: str, states: Collection[str], since: datetime
    ) -> list[str]:
        prefix = f"{provider}:"
        rows = await self._run(
            lambda: (
                self._conn()
                .execute(
                    "SELECT key, data FROM invoices WHERE substr(key, 1, ?) = ? "
                    "AND state IN (SELECT value FROM json_each(?)) ORDER BY key",
                    (len(prefix), prefix, msgspec.json.encode(list(states))),
                )
                .fetchall()
            )
        )
        return [
            key.removeprefix(prefix)
            for key, data in rows
            if data is not None and _updated_since(data, since)
        ]

    async def settlement_versions(self, key: str) -> list[bytes]:
        return await self._rows(_VERSIONS.format(p1="?"), key)

    async def order_settlements(self, order_id: str) -> list[bytes]:
        return await self._rows(_ORDER.format(p1="?"), order_id)

    async def _rows(self, query: str, arg: str) -> list[bytes]:
        rows = await self._run(lambda: self._conn().execute(query, (arg,)).fetchall())
        return [bytes(row[0]) for row in rows]

    async def close(self) -> None:
        def _close() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        with contextlib.suppress(RuntimeError):  # executor already shut down
            await self._run(_close)
        self._executor.shutdown(wait=True)


@final
class PostgresReader:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresReader:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            exists = await pool.fetchval("SELECT to_regclass('payhook_schema') IS NOT NULL")
            version = (
                await pool.fetchval("SELECT max(version) FROM payhook_schema") if exists else None
            )
            _check_version(version)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def processed_event_ids(self, keys: Collection[str]) -> dict[str, frozenset[str]]:
        rows = await self._pool.fetch(
            "SELECT key, data FROM invoices WHERE key = ANY($1::text[])", list(keys)
        )
        return {r["key"]: _event_ids(r["data"]) for r in rows if r["data"] is not None}

    async def refreshable(
        self, provider: str, states: Collection[str], since: datetime
    ) -> list[str]:
        prefix = f"{provider}:"
        rows = await self._pool.fetch(
            "SELECT key, data FROM invoices WHERE starts_with(key, $1) "
            "AND state = ANY($2::text[]) ORDER BY key",
            prefix,
            list(states),
        )
        return [
            r["key"].removeprefix(prefix)
            for r in rows
            if r["data"] is not None and _updated_since(r["data"], since)
        ]

    async def settlement_versions(self, key: str) -> list[bytes]:
        rows = await self._pool.fetch(_VERSIONS.format(p1="$1"), key)
        return [bytes(r["data"]) for r in rows]

    async def order_settlements(self, order_id: str) -> list[bytes]:
        rows = await self._pool.fetch(_ORDER.format(p1="$1"), order_id)
        return [bytes(r["data"]) for r in rows]

    async def close(self) -> None:
        await self._pool.close()
