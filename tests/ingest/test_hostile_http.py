"""The HTTP front door against clients that misbehave on the wire (issue 9, defects 3, 7, 8):
bytes that are not UTF-8, bodies that never finish, clients that hang up, request lines aiohttp
cannot parse. Raw sockets, so that what is sent is exactly what a hostile client sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from structlog.typing import EventDict

from service.ingest.app import METRICS, SETTINGS
from service.logs import merge_request_fields
from service.settings import Settings
from tests.fixtures_app import SEED_003, ClientFactory, replace, token_for

Client = TestClient[Any, Any]
BFX = "/v1/webhooks/bitfinex/order123"


async def connect(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = client.server
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response, read in full by its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def exchange(client: Client, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(client)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            return await answer(reader)
    finally:
        writer.close()


def post_head(path: str, length: int, *extra: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def requests_in(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "request"]


def outcomes(client: Client) -> dict[tuple[str, str], float]:
    """payhook_webhooks_total by (provider, outcome), read from the metrics page."""
    assert client.app is not None
    found: dict[tuple[str, str], float] = {}
    for line in client.app[METRICS].render().decode().splitlines():
        if line.startswith("payhook_webhooks_total{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            found[(labels["provider"].strip('"'), labels["outcome"].strip('"'))] = float(
                line.rsplit(" ", 1)[1]
            )
    return found


# --- defect 3: invalid UTF-8 in the Crypto POS body ------------------------------------------


async def test_invalid_utf8_in_the_cryptopos_signature_is_invalid_json_never_500(
    app_client: ClientFactory, offline_settings: Settings
) -> None:
    client = await app_client(replace(offline_settings, auth_failure_budget=3))
    body = b'{"signature":"\xff","data":{}}'
    with capture_logs() as logs:
        statuses = []
        for _ in range(6):
            status, _, text = await exchange(
                client, post_head("/v1/webhooks/cryptopos", len(body)) + body
            )
            statuses.append(status)
            assert json.loads(text)["error"] == "invalid_json"
    # Not JSON: 400 every time, never 429 (DESIGN's precedence) ...
    assert statuses == [400] * 6
    assert not [line for line in logs if line.get("log_level") == "error"]
    # ... but each counted against the failure budget: a wrong signature now gets 429.
    wrong = b'{"signature":"00","data":{}}'
    status, _, text = await exchange(
        client, post_head("/v1/webhooks/cryptopos", len(wrong)) + wrong
    )
    assert (status, json.loads(text)["error"]) == (429, "rate_limited")


# --- defect 7: the secret before the body, a deadline for the body, clients that leave ---------


async def test_a_stalled_body_without_a_secret_is_refused_at_once(offline_client: Client) -> None:
    """Content-Length 60000 and 100 bytes sent: the missing token answers 401 before any of the
    body is awaited."""
    status, _, text = await exchange(offline_client, post_head(BFX, 60_000) + b" " * 100)
    assert (status, json.loads(text)["error"]) == (401, "unauthorized")


async def test_413_and_415_come_from_the_headers_before_the_secret(
    offline_client: Client,
) -> None:
    status, _, text = await exchange(offline_client, post_head(BFX, 70_000) + b" " * 100)
    assert (status, json.loads(text)["error"]) == (413, "payload_too_large")
    head = post_head(BFX, 60_000).replace(b"application/json", b"text/plain")
    status, _, text = await exchange(offline_client, head + b" " * 100)
    assert (status, json.loads(text)["error"]) == (415, "unsupported_media_type")


async def test_an_unauthenticated_chunked_body_is_never_read(offline_client: Client) -> None:
    head = (
        f"POST {BFX} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    status, _, text = await exchange(offline_client, head + b"10\r\n" + b" " * 16 + b"\r\n")
    assert (status, json.loads(text)["error"]) == (401, "unauthorized")


async def test_an_authenticated_chunked_body_past_the_limit_is_413(
    offline_client: Client,
) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    head = (
        f"POST {BFX}?token={token} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"8000\r\n" + b" " * 0x8000 + b"\r\n"
    status, _, text = await exchange(offline_client, head + chunk * 3 + b"0\r\n\r\n")
    assert (status, json.loads(text)["error"]) == (413, "payload_too_large")


async def test_a_body_that_does_not_arrive_in_time_closes_the_connection(
    app_client: ClientFactory, offline_settings: Settings
) -> None:
    client = await app_client(replace(offline_settings, body_timeout=0.3))
    token = token_for(offline_settings, "bitfinex", "order123")
    reader, writer = await connect(client)
    with capture_logs(processors=[merge_request_fields]) as logs:
        try:
            writer.write(post_head(f"{BFX}?token={token}", 60_000) + b" " * 100)
            await writer.drain()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed, without an answer
        finally:
            writer.close()
    (line,) = requests_in(logs)
    assert (line["status"], line["error"]) == (408, "body_timeout")
    assert not [entry for entry in logs if entry["log_level"] == "error"]
    assert outcomes(client)[("bitfinex", "body_timeout")] == 1


async def test_a_client_that_hangs_up_mid_body_is_logged_as_gone_not_500(
    offline_client: Client,
) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    logged = asyncio.Event()

    def notice(logger: object, name: str, event: EventDict) -> EventDict:
        if event["event"] == "request":
            logged.set()
        return event

    with capture_logs(processors=[merge_request_fields, notice]) as logs:
        reader, writer = await connect(offline_client)
        expect = "Expect: 100-continue"
        writer.write(post_head(f"{BFX}?token={token}", 60_000, expect) + b" " * 100)
        # aiohttp says "100 Continue" as the handler starts: from then on it awaits the body.
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.transport.abort()
        async with asyncio.timeout(5):
            await logged.wait()
    (line,) = requests_in(logs)
    assert line["error"] == "client_gone"
    assert line["status"] < 500
    assert not [entry for entry in logs if entry["log_level"] == "error"]
    assert ("bitfinex", "internal") not in outcomes(offline_client)


async def test_a_wrong_token_is_refused_before_the_client_is_asked_for_its_body(
    offline_client: Client,
) -> None:
    """A client that waits for "100 Continue" before sending its body hears 401 instead: an
    unauthenticated client is never invited to send a body."""
    head = post_head(f"{BFX}?token=k1.wrong", 60_000, "Expect: 100-continue")
    status, _, text = await exchange(offline_client, head)
    assert status == 401
    assert json.loads(text)["error"] == "unauthorized"


async def test_an_authenticated_client_is_asked_for_its_body_and_answered_after_it(
    offline_client: Client,
) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    reader, writer = await connect(offline_client)
    try:
        writer.write(post_head(f"{BFX}?token={token}", len(SEED_003), "Expect: 100-continue"))
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(SEED_003)
            status, _, _ = await answer(reader)
    finally:
        writer.close()
    assert status == 503  # it got as far as publishing (offline broker, no spool room)


async def test_every_route_refuses_an_unknown_expectation_in_json_logged_without_echo(
    offline_client: Client,
) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    expect = "Expect: secret-handshake"
    webhook = post_head(f"{BFX}?token={token}", len(SEED_003), expect) + SEED_003
    healthz = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{expect}\r\n\r\n".encode()
    with capture_logs(processors=[merge_request_fields]) as logs:
        for raw in (webhook, healthz):
            status, headers, text = await exchange(offline_client, raw)
            assert status == 417
            assert headers["content-type"].startswith("application/json")
            assert json.loads(text)["error"] == "bad_request"
            assert b"secret-handshake" not in text
    assert [line["status"] for line in requests_in(logs)] == [417, 417]


async def test_no_route_invites_a_body_it_will_not_read(offline_client: Client) -> None:
    """A route that does not exist answers 404 at once: no "100 Continue" first."""
    with capture_logs(processors=[merge_request_fields]) as logs:
        head = post_head("/nowhere", 60_000, "Expect: 100-continue")
        status, _, text = await exchange(offline_client, head)
    assert status == 404
    assert json.loads(text)["error"] == "not_found"
    assert [line["status"] for line in requests_in(logs)] == [404]


async def test_a_complete_body_is_read_at_once(offline_client: Client) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    status, _, _ = await exchange(
        offline_client, post_head(f"{BFX}?token={token}", len(SEED_003)) + SEED_003
    )
    assert status == 503  # it got as far as publishing (offline broker, no spool room)


# --- defect 8: aiohttp's own answers in our format ---------------------------------------------


async def test_an_unparseable_request_line_is_answered_in_json_without_echo(
    offline_client: Client,
) -> None:
    assert offline_client.app is not None
    token = token_for(offline_client.app[SETTINGS], "bitfinex", "order123")
    with capture_logs(processors=[merge_request_fields]) as logs:
        status, headers, text = await exchange(
            offline_client, f"POST {BFX}?token={token} HTTP/1.1x\r\nHost: x\r\n\r\n".encode()
        )
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    payload = json.loads(text)
    assert payload["error"] == "bad_request"
    assert token not in text.decode()
    assert "token=" not in text.decode()
    (line,) = requests_in(logs)
    assert (line["status"], line["error"]) == (400, "bad_request")
    assert token not in json.dumps(logs, default=str)
    assert outcomes(offline_client)[("unknown", "bad_request")] == 1


async def test_a_path_with_an_encoded_newline_is_our_404(offline_client: Client) -> None:
    for path in ("/%0A", "/healthz%0A", "/x%0D%0Ay"):
        status, headers, text = await exchange(
            offline_client, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert status == 404
        assert json.loads(text)["error"] == "not_found"
        assert headers["x-request-id"]
