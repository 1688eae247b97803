"""The README's operator commands, run as written against a stack laid out as ``make run`` lays
it out (``var/dev-signing-keys``, ``var/dev/payhook.db``, ``var/spool``): a real broker, a real
``payhook serve`` and ``payhook consume``."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from devtools.devbroker import LocalBroker, free_port
from devtools.devrun import dev_signing_keys
from tests.ingest.test_durability import wait_status

REPO = Path(__file__).resolve().parents[2]


def operator_examples() -> list[str]:
    """The command lines of the first ``sh`` block under "### Operator commands"."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Operator commands") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_examples_cover_every_operator_command() -> None:
    text = "\n".join(operator_examples())
    for command in (
        "send-test",
        "settlement --order",
        "--history",
        "dlq list",
        "dlq redrive",
        "--dry-run",
        "spool status",
        "--json",
        "spool drain",
    ):
        assert command in text, command


@pytest.fixture
async def stack(
    kafka_broker: LocalBroker, tmp_path: Path
) -> AsyncIterator[tuple[Path, dict[str, str]]]:
    """``make run``'s layout in a fresh directory, serve and consume running in it."""
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    keys = dev_signing_keys(tmp_path / "var" / "dev-signing-keys")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYHOOK_")},
        "PAYHOOK_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "PAYHOOK_TOPIC_PREFIX": f"readme{port}",
        "PAYHOOK_HTTP_PORT": str(port),
        "PAYHOOK_CONSUMER_PORT": str(free_port()),
        "PAYHOOK_CRYPTOPOS_SECRET": "readme-merchant-secret",
        "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS": "6000",
    }
    processes = [
        await asyncio.create_subprocess_exec(
            str(REPO / ".venv" / "bin" / "payhook"),
            verb,
            cwd=tmp_path,
            env={
                **env,
                "PAYHOOK_SIGNING_KEYS": keys,
                "PAYHOOK_STORE_URL": "sqlite:///var/dev/payhook.db",
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for verb in ("serve", "consume")
    ]
    try:
        async with ClientSession() as http:
            await wait_status(http, f"http://127.0.0.1:{port}/readyz", 200)
            await wait_status(http, f"http://127.0.0.1:{env['PAYHOOK_CONSUMER_PORT']}/readyz", 200)
        yield tmp_path, env
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), 30)


def run_line(
    cwd: Path, env: dict[str, str], state: list[str], line: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", "\n".join([*state, line])],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_readme_operator_examples_run_as_written(
    stack: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = stack
    state: list[str] = []  # exports and variables, as an interactive shell would keep them
    for line in operator_examples():
        if line.startswith("export ") or re.match(r"^[A-Z_]+=", line):
            state.append(line)
            continue
        deadline = time.monotonic() + 30
        while True:
            done = await asyncio.to_thread(run_line, cwd, env, state, line)
            # The README says so: a settlement may take the consumer a moment.
            if done.returncode == 0 or "settlement" not in line or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if line.endswith("spool drain var/spool"):
            # The running serve holds its spool: refused, in one line, exit 1.
            assert done.returncode == 1, (line, done)
            assert "held by a live process" in done.stderr
            continue
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        if "--history" in line:
            assert '"invoice_id":"payhook-test-' in done.stdout
        if "send-test" in line:
            assert done.stdout.splitlines()[-1].startswith("200 ")
