"""A fresh broker, ``payhook serve`` and ``payhook consume`` per fault; the table at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from faults.harness import Cluster, Verdict

# The scale-out scenarios share one real PostgreSQL server, a fresh database each.
from tests.fixtures_postgres import postgres_server, postgres_url  # noqa: F401

VERDICTS = pytest.StashKey[list[Verdict]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[VERDICTS] = []


@pytest.fixture
def verdicts(request: pytest.FixtureRequest) -> list[Verdict]:
    return request.config.stash[VERDICTS]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        await cluster.start(http)
        yield cluster
    finally:
        await cluster.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    verdicts = terminalreporter.config.stash.get(VERDICTS, [])
    if not verdicts:
        return
    terminalreporter.section("faults: every 2xx on the topic and counted exactly once")
    terminalreporter.write_line(Verdict.header())
    for verdict in verdicts:
        terminalreporter.write_line(verdict.row())
    terminalreporter.write_line(
        "dup-topic: repeated records on payhook.invoice-events.v1 (same event-id);"
        " dup-consum: repeats the consumer dropped by event_id (last consumer process);"
        " stl-recs / stl-bad: records on payhook.settlements.v1, and those out of version"
        " order, republished with other content, or missing an invoice's stored version"
    )
