"""Where invoice states and the settlement outbox live: SQLite or PostgreSQL, one schema.

One small interface (:class:`Store`), two implementations:

- SQLite (stdlib ``sqlite3``, WAL, ``synchronous=FULL``): the embedded default, for one
  consumer instance; a lock file refuses a second one. The blocking calls run on one dedicated
  thread so the event loop (and the Kafka heartbeat) keeps running.
- PostgreSQL (asyncpg): many consumer instances at once. A batch locks its invoices' rows
  (``SELECT ... FOR UPDATE``, in key order) for the whole transaction, so two consumers racing
  on one invoice serialize on it and neither loses nor double-counts a payment. Deadlocks and
  serialization failures retry the whole transaction; the update function is pure, so running it
  again is safe.

Publishing is fenced (:meth:`Store.fence`): a settlement version is published only while it is
still the invoice's stored version, and no newer one can be stored until the publish is
acknowledged (PostgreSQL: ``FOR SHARE`` on the invoices' rows, which a writer's ``FOR UPDATE``
waits for). So a version never reaches the (compacted) settlements topic after a newer one of
the same invoice, whichever consumer stored which.

Each batch is one transaction: it drops outbox entries already published, loads the states of
the batch's invoices, lets the caller's pure update function compute the new states and
settlements, and writes both states and the outbox of settlement versions still to publish.
The schema is created or migrated at start-up (``payhook_schema`` holds its version; a store of
an older release is migrated in place, never recreated). Every settlement version is kept
(``settlements``, for ``payhook settlement --history``) and each invoice's order id is indexed
(for ``--order``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, final

import asyncpg
import msgspec

from schemas.amounts import PlainEncoder
from schemas.events import Settlement
from service.state import InvoiceState, invoice_key

SCHEMA_VERSION: Final = 2

# One schema for both databases; only the binary column type is spelt differently.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS invoices (
            key TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            state TEXT NOT NULL,
            data {blob}
        )""",
        # The settlement versions stored but not yet published; the settlement itself is the
        # one in the invoice's state (written in the same transaction).
        """CREATE TABLE IF NOT EXISTS outbox (
            key TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        )""",
    ),
    # Every settlement version (the exact JSON published) and each invoice's order id, indexed.
    # Invoices stored by version 1 get theirs, and their current settlement, from their state.
    2: (
        """CREATE TABLE IF NOT EXISTS settlements (
            key TEXT NOT NULL,
            version INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (key, version)
        )""",
        "ALTER TABLE invoices ADD COLUMN order_id TEXT",
        "CREATE INDEX IF NOT EXISTS invoices_order_id ON invoices (order_id)",
    ),
}

_encoder: Final = PlainEncoder()  # amounts in plain notation, as on the topics
_state_decoder: Final = msgspec.json.Decoder(InvoiceState)

# Failures that may pass (a database restarting, a lock held too long): retry the batch.
TRANSIENT_ERRORS: Final[tuple[type[Exception], ...]] = (
    sqlite3.OperationalError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)

# Failures caused by what a record holds, not by the store being unavailable: the same data
# fails every time (PostgreSQL refuses a NUL in text: CharacterNotInRepertoireError; a value out
# of a column's range; a constraint). Caught before TRANSIENT_ERRORS, whose classes some of
# these subclass: the consumer sends such a record to the DLQ and goes on (DESIGN.md, rule 9).
DATA_ERRORS: Final[tuple[type[Exception], ...]] = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22
    asyncpg.exceptions.IntegrityConstraintViolationError,  # class 23
    asyncpg.exceptions._base.DataError,  # a value asyncpg itself cannot send (client side)
    sqlite3.DataError,
    sqlite3.IntegrityError,
    UnicodeError,  # text that cannot be encoded (a lone surrogate)
    OverflowError,  # an integer beyond the column
)

_UNPUBLISHED: Final = (
    "SELECT o.key, o.version, i.data FROM outbox o JOIN invoices i ON i.key = o.key ORDER BY o.key"
)

# (key, version) of a settlement version already published.
Published = tuple[str, int]


@dataclass(slots=True)
class Writes:
    """What one batch transaction writes: changed states, settlements to publish, and every
    new settlement version (``history``; the outbox's are kept even when it is left empty)."""

    states: dict[str, InvoiceState] = field(default_factory=dict)
    outbox: dict[str, Settlement] = field(default_factory=dict)
    history: list[Settlement] = field(default_factory=list)


W = TypeVar("W", bound=Writes)
Update = Callable[[Mapping[str, InvoiceState]], W]


@final
class OutboxItem(msgspec.Struct, frozen=True):
    key: str
    version: int
    settlement: bytes


class Store(Protocol):
    async def transact(
        self, keys: Collection[str], update: Update[W], published: Sequence[Published] = ()
    ) -> W:
        """One transaction: forget ``published`` outbox entries, load the states of ``keys``,
        call ``update`` with them (invoices never seen are absent) and write what it returns."""
        ...

    async def unpublished(self) -> list[OutboxItem]:
        """Settlement versions stored but not yet marked published, oldest key first."""
        ...

    async def mark_published(self, published: Sequence[Published]) -> None: ...

    def fence(
        self, versions: Mapping[str, int]
    ) -> contextlib.AbstractAsyncContextManager[set[str]]:
        """For publishing settlement ``versions`` (invoice key -> version): yields the keys
        whose stored version is still that one, and keeps a newer version of them from being
        stored until the block ends. A key left out has a newer version stored, which whoever
        stored it publishes (after this block)."""
        ...

    async def get(self, key: str) -> InvoiceState | None: ...

    async def close(self) -> None: ...


class StoreError(RuntimeError):
    """The store cannot be opened (bad URL, locked by another consumer)."""


def _check_not_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store's schema is version {version}, newer than this release's "
            f"{SCHEMA_VERSION}: run the release that wrote it"
        )


async def open_store(url: str) -> Store:
    """Opens the store named by ``PAYHOOK_STORE_URL`` and creates or migrates its schema."""
    if url.startswith("sqlite:///"):
        return await SqliteStore.open(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresStore.open(url)
    raise StoreError("store URL must start with sqlite:/// or postgresql://")


def _outbox_rows(writes: Writes) -> list[tuple[str, int]]:
    return [(k, s.version) for k, s in writes.outbox.items()]


def _outbox_item(key: str, version: int, data: bytes) -> OutboxItem:
    settlement = _state_decoder.decode(data).settlement
    return OutboxItem(key, version, _encoder.encode(settlement))


def _state_rows(writes: Writes) -> list[tuple[str, int, str, bytes, str | None]]:
    return [
        (k, st.settlement.version, st.settlement.state, _encoder.encode(st), st.settlement.order_id)
        for k, st in writes.states.items()
    ]


def _history_rows(writes: Writes) -> list[tuple[str, int, bytes]]:
    """(key, version, settlement JSON as published) of every new version, each once."""
    versions = {(s.provider, s.invoice_id, s.version): s for s in writes.history}
    for s in writes.outbox.values():
        versions.setdefault((s.provider, s.invoice_id, s.version), s)
    return [
        (invoice_key(provider, invoice_id), version, _encoder.encode(s))
        for (provider, invoice_id, version), s in versions.items()
    ]


def _backfill(rows: Sequence[tuple[str, bytes | None]]) -> tuple[list[Any], list[Any]]:
    """Migration 2 for invoices stored by version 1: (order ids, current settlements)."""
    orders: list[tuple[str | None, str]] = []
    settlements: list[tuple[str, int, bytes]] = []
    for key, data in rows:
        if data is None:
            continue
        settlement = _state_decoder.decode(data).settlement
        orders.append((settlement.order_id, key))
        settlements.append((key, settlement.version, _encoder.encode(settlement)))
    return orders, settlements


# --- SQLite -----------------------------------------------------------------------------------

_SQLITE_FORGET: Final = "DELETE FROM outbox WHERE key = ? AND version = ?"
_SQLITE_HISTORY: Final = (
    "INSERT INTO settlements (key, version, data) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_SQLITE_VERSIONS: Final = (
    "SELECT key, version FROM invoices WHERE key IN (SELECT value FROM json_each(?))"
)


def _current(versions: Mapping[str, int], stored: Mapping[str, int]) -> set[str]:
    """The keys of ``versions`` no newer stored version supersedes."""
    return {key for key, version in versions.items() if stored.get(key, 0) <= version}


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taking the write lock up front; rolled back on any failure."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@final
class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="payhook-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        store = cls(path)
        try:
            await store._run(store._open)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self._path} is in use by another consumer; SQLite serves one instance "
                "(use PostgreSQL for several)"
            ) from None
        self._lock_fd = fd
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # Offsets are committed to Kafka after this commit: it must survive a power loss too.
        db.execute("PRAGMA synchronous=FULL")
        with _immediate(db):
            db.execute("CREATE TABLE IF NOT EXISTS payhook_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM payhook_schema").fetchone()
            current = row[0] or 0
            _check_not_newer(current)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    db.execute(statement.format(blob="BLOB"))
                if version == 2:
                    orders, settlements = _backfill(
                        db.execute("SELECT key, data FROM invoices").fetchall()
                    )
                    db.executemany("UPDATE invoices SET order_id = ? WHERE key = ?", orders)
                    db.executemany(_SQLITE_HISTORY, settlements)
                db.execute("INSERT INTO payhook_schema (version) VALUES (?)", (version,))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is closed")
        return self._db

    async def transact(
        self, keys: Collection[str], update: Update[W], published: Sequence[Published] = ()
    ) -> W:
        result: W = await self._run(self._transact, keys, update, published)
        return result

    def _transact(
        self, keys: Collection[str], update: Update[W], published: Sequence[Published]
    ) -> W:
        with _immediate(self._conn()) as db:
            if published:
                db.executemany(_SQLITE_FORGET, published)
            rows = db.execute(
                "SELECT key, data FROM invoices WHERE key IN (SELECT value FROM json_each(?))",
                (msgspec.json.encode(list(keys)),),
            ).fetchall()
            decode = _state_decoder.decode
            states = {key: decode(data) for key, data in rows if data is not None}
            writes = update(states)
            if writes.states:
                db.executemany(
                    "INSERT INTO invoices (key, version, state, data, order_id) "
                    "VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET version = excluded.version, "
                    "state = excluded.state, data = excluded.data, order_id = excluded.order_id",
                    _state_rows(writes),
                )
            history = _history_rows(writes)
            if history:
                db.executemany(_SQLITE_HISTORY, history)
            if writes.outbox:
                db.executemany(
                    "INSERT INTO outbox (key, version) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET version = excluded.version "
                    "WHERE outbox.version < excluded.version",
                    _outbox_rows(writes),
                )
        return writes

    async def unpublished(self) -> list[OutboxItem]:
        rows = await self._run(lambda: self._conn().execute(_UNPUBLISHED).fetchall())
        return [_outbox_item(k, v, d) for k, v, d in rows]

    async def mark_published(self, published: Sequence[Published]) -> None:
        if published:
            await self._run(self._mark_published, published)

    def _mark_published(self, published: Sequence[Published]) -> None:
        with _immediate(self._conn()) as db:
            db.executemany(_SQLITE_FORGET, published)

    @contextlib.asynccontextmanager
    async def fence(self, versions: Mapping[str, int]) -> AsyncIterator[set[str]]:
        # One consumer process (the lock file) whose batches publish in order: reading the
        # stored versions is the whole fence.
        stored: dict[str, int] = {}
        if versions:
            keys = msgspec.json.encode(list(versions))
            rows = await self._run(
                lambda: self._conn().execute(_SQLITE_VERSIONS, (keys,)).fetchall()
            )
            stored = dict(rows)
        yield _current(versions, stored)

    async def get(self, key: str) -> InvoiceState | None:
        row = await self._run(
            lambda: (
                self._conn().execute("SELECT data FROM invoices WHERE key = ?", (key,)).fetchone()
            )
        )
        return None if row is None or row[0] is None else _state_decoder.decode(row[0])

    async def close(self) -> None:
        def _close() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # releases the flock

        with contextlib.suppress(RuntimeError):  # executor already shut down
            await self._run(_close)
        self._executor.shutdown(wait=True)


# --- PostgreSQL -------------------------------------------------------------------------------

_RETRYABLE: Final = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
_MAX_ATTEMPTS: Final = 10
_MIGRATION_LOCK: Final = 0x70617968  # "payh": one migrator at a time
_PG_HISTORY_ROW: Final = (
    "INSERT INTO settlements (key, version, data) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
)
_PG_FORGET: Final = (
    "DELETE FROM outbox o USING unnest($1::text[], $2::int[]) AS p(key, version) "
    "WHERE o.key = p.key AND o.version = p.version"
)


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """(Non-empty) rows as column lists, the shape ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


@final
class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        # A batch's transaction, the previous batch's publish fence, and one spare.
        pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS payhook_schema (version INTEGER NOT NULL)"
                )
                current = await conn.fetchval("SELECT max(version) FROM payhook_schema") or 0
                _check_not_newer(current)
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version]:
                        await conn.execute(statement.format(blob="BYTEA"))
                    if version == 2:
                        orders, settlements = _backfill(
                            [tuple(r) for r in await conn.fetch("SELECT key, data FROM invoices")]
                        )
                        await conn.executemany(
                            "UPDATE invoices SET order_id = $1 WHERE key = $2", orders
                        )
                        await conn.executemany(_PG_HISTORY_ROW, settlements)
                    await conn.execute("INSERT INTO payhook_schema (version) VALUES ($1)", version)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def transact(
        self, keys: Collection[str], update: Update[W], published: Sequence[Published] = ()
    ) -> W:
        ordered = sorted(set(keys))
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                return await self._transact(ordered, update, published)
            except _RETRYABLE:
                if attempt == _MAX_ATTEMPTS:
                    raise
                await asyncio.sleep(0.005 * attempt)  # back off before retrying the lock race
        raise AssertionError("unreachable")

    async def _transact(
        self, keys: list[str], update: Update[W], published: Sequence[Published]
    ) -> W:
        async with self._pool.acquire() as conn, conn.transaction():
            if published:
                await conn.execute(_PG_FORGET, *_columns(published))
            # Placeholders first, in key order, so that every invoice has a row to lock.
            await conn.execute(
                "INSERT INTO invoices (key, version, state) "
                "SELECT k, 0, '' FROM unnest($1::text[]) AS k ORDER BY k "
                "ON CONFLICT (key) DO NOTHING",
                keys,
            )
            rows = await conn.fetch(
                "SELECT key, data FROM invoices WHERE key = ANY($1::text[]) "
                "ORDER BY key FOR UPDATE",
                keys,
            )
            decode = _state_decoder.decode
            states = {r["key"]: decode(r["data"]) for r in rows if r["data"] is not None}
            writes = update(states)
            if writes.states:
                await conn.execute(
                    "UPDATE invoices SET version = u.version, state = u.state, data = u.data, "
                    "order_id = u.order_id "
                    "FROM unnest($1::text[], $2::int[], $3::text[], $4::bytea[], $5::text[]) "
                    "AS u(key, version, state, data, order_id) WHERE invoices.key = u.key",
                    *_columns(_state_rows(writes)),
                )
            history = _history_rows(writes)
            if history:
                await conn.execute(
                    "INSERT INTO settlements (key, version, data) "
                    "SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[]) "
                    "ON CONFLICT DO NOTHING",
                    *_columns(history),
                )
            if writes.outbox:
                await conn.execute(
                    "INSERT INTO outbox (key, version) "
                    "SELECT * FROM unnest($1::text[], $2::int[]) "
                    "ON CONFLICT (key) DO UPDATE SET version = excluded.version "
                    "WHERE outbox.version < excluded.version",
                    *_columns(_outbox_rows(writes)),
                )
            return writes

    async def unpublished(self) -> list[OutboxItem]:
        rows = await self._pool.fetch(_UNPUBLISHED)
        return [_outbox_item(k, v, d) for k, v, d in rows]

    async def mark_published(self, published: Sequence[Published]) -> None:
        if not published:
            return
        await self._pool.execute(_PG_FORGET, *_columns(published))

    @contextlib.asynccontextmanager
    async def fence(self, versions: Mapping[str, int]) -> AsyncIterator[set[str]]:
        if not versions:
            yield set()
            return
        # Shared row locks, taken in key order like transact's, held until the publish is
        # acknowledged: a batch storing a newer version waits for them.
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT key, version FROM invoices WHERE key = ANY($1::text[]) "
                "ORDER BY key FOR SHARE",
                sorted(versions),
            )
            yield _current(versions, {r["key"]: r["version"] for r in rows})

    async def get(self, key: str) -> InvoiceState | None:
        data = await self._pool.fetchval("SELECT data FROM invoices WHERE key = $1", key)
        return None if data is None else _state_decoder.decode(data)

    async def close(self) -> None:
        await self._pool.close()
