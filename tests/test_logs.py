"""Log lines as data: one summary per request, a request id, never a secret or customer data."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import io
import json
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

import service.logs
from service.logs import (
    LineWriter,
    bind_event,
    bind_request,
    configure_logging,
    merge_request_fields,
)
from service.settings import Settings
from tests.fixtures_app import PII, ClientFactory, bitfinex, cryptopos_body, encode, token_for

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


def requests_in(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "request"]


async def test_one_summary_line_per_request_without_token_or_pii(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    token = token_for(kafka_settings, "bitfinex", "order123")
    with capture_logs(processors=[merge_request_fields]) as logs:
        accepted = await client.post(
            "/v1/webhooks/bitfinex/order123",
            data=encode(bitfinex()),
            params={"token": token},
            headers=JSON,
        )
        refused = await client.post(
            "/v1/webhooks/bitfinex/order123",
            data=encode(bitfinex()),
            params={"token": token + "x"},
            headers={**JSON, "Token": "header-secret-value"},
        )
        await client.post("/v1/webhooks/cryptopos", data=cryptopos_body(), headers=JSON)
    assert (accepted.status, refused.status) == (200, 401)
    lines = requests_in(logs)
    assert len(lines) == 3
    first, second, third = lines
    assert first["status"] == 200
    assert first["provider"] == "bitfinex"
    assert first["path"] == "/v1/webhooks/bitfinex/order123"
    assert first["event_id"] == (await accepted.json())["event_id"]
    assert first["error"] is None
    assert second["error"] == "unauthorized"
    assert "event_id" not in second  # context of the previous request does not leak
    assert third["provider"] == "cryptopos"
    assert len({line["request_id"] for line in lines}) == 3
    assert accepted.headers["X-Request-Id"] == first["request_id"]

    everything = repr(logs)
    assert token not in everything
    assert token.split(".")[1][:12] not in everything
    assert "header-secret-value" not in everything
    assert "cryptopos-merchant-secret" not in everything
    assert json.loads(cryptopos_body())["signature"] not in everything
    for value in PII:
        assert value not in everything


async def test_request_id_is_taken_from_the_caller_when_sane(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    with capture_logs(processors=[merge_request_fields]) as logs:
        kept = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
        replaced = await client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert kept.headers["X-Request-Id"] == "abc-123"
    assert replaced.headers["X-Request-Id"] != "bad id\twith spaces"
    assert [line["request_id"] for line in requests_in(logs)] == [
        "abc-123",
        replaced.headers["X-Request-Id"],
    ]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = False


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_context_variables(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", cache=False)
    log = structlog.get_logger("test")

    def in_a_request() -> None:
        bind_request("r-1")
        log.info("hello", n=1)
        bind_event("e-1")
        log.info("published")

    contextvars.copy_context().run(in_a_request)
    log.info("outside")
    logging.getLogger("aiokafka").warning("from the standard library %s", "too")
    logging.getLogger("aiokafka").info("below the library threshold")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 4
    assert lines[0]["event"] == "hello"
    assert lines[0]["request_id"] == "r-1"
    assert "event_id" not in lines[0]
    assert lines[0]["level"] == "info"
    assert lines[0]["timestamp"].endswith("Z")
    assert (lines[1]["request_id"], lines[1]["event_id"]) == ("r-1", "e-1")
    assert "request_id" not in lines[2]
    assert lines[3]["event"] == "from the standard library too"
    assert lines[3]["logger"] == "aiokafka"


@pytest.mark.usefixtures("restore_logging")
def test_console_format_is_for_humans(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", cache=False)
    structlog.get_logger("test").info("hello", n=1)
    err = capsys.readouterr().err
    assert "hello" in err
    assert "n=1" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


class CountingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


async def test_lines_of_one_loop_turn_are_written_with_one_call() -> None:
    file = CountingFile()
    writer = LineWriter(file)
    writer.msg(b'{"n":1}')
    writer.info(b'{"n":2}')
    assert file.getvalue() == b""
    written = asyncio.Event()
    asyncio.get_running_loop().call_soon(written.set)  # runs after the writer's flush
    await written.wait()
    assert file.getvalue() == b'{"n":1}\n{"n":2}\n'
    assert file.writes == 1


def test_outside_a_loop_lines_are_written_at_once() -> None:
    file = CountingFile()
    LineWriter(file).error(b"x")
    assert file.getvalue() == b"x\n"


@pytest.mark.usefixtures("restore_logging")
async def test_a_request_aiohttp_cannot_parse_is_logged_without_its_bytes(
    app_client: ClientFactory, offline_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", cache=False)
    client = await app_client(offline_settings)
    secret = token_for(offline_settings, "bitfinex", "order123")
    path = "/v1/webhooks/bitfinex/order123"
    malformed = [
        f"POST {path}?token={secret}{'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"POST {path} HTTP/1.1\r\nHost: x\r\nToken: {secret}{'B' * 9000}\r\n\r\n",
        f"POST {path}?token={secret} HTTP/1.1\r\nHost: x\r\nBad Header: {secret}\r\n\r\n",
    ]
    for raw in malformed:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(raw.encode())
        status_line = await reader.readline()  # aiohttp logs before it answers
        writer.close()
        await writer.wait_closed()
        assert status_line.split()[1] == b"400"
    err = capsys.readouterr().err
    assert secret not in err
    assert secret.split(".")[1][:12] not in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["event"] == "bad_http_request"]
    assert [line["error"] for line in refused] == ["LineTooLong", "LineTooLong", "BadHttpMessage"]
    assert all(line["status"] == 400 and line["level"] == "warning" for line in refused)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_the_request_line_goes_through_the_configured_processors(
    app_client: ClientFactory,
    offline_settings: Settings,
    capsys: pytest.CaptureFixture[str],
    log_format: str,
) -> None:
    configure_logging(log_format, cache=False)
    client = await app_client(offline_settings)
    response = await client.get("/healthz", headers={"X-Request-Id": "req-7"})
    assert response.status == 200
    err = capsys.readouterr().err  # written the loop turn after, before the answer is read
    if log_format == "console":
        assert "request" in err
        assert "request_id=req-7" in err
        return
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (line,) = [line for line in lines if line["event"] == "request"]
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert (line["request_id"], line["path"], line["method"]) == ("req-7", "/healthz", "GET")
    assert (line["status"], line["error"], line["provider"]) == (200, None, None)


@pytest.mark.usefixtures("restore_logging")
def test_configuring_logging_again_registers_no_more_exit_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered: list[object] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(service.logs._Installed, "writer", None)
    for _ in range(3):
        configure_logging("json", cache=False)
    assert registered == [service.logs._Installed.flush]
