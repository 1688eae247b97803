"""Every HTTP answer of the ingest app, and which fault answers first.

In ``offline_client`` the broker is a port nobody listens on and the spool has no room: any
request that gets as far as publishing is answered 503, which proves it passed every earlier
check. The few tests that need
a 200 use the session broker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.ingest.app import METRICS, SETTINGS
from service.settings import Settings
from tests.fixtures_app import (
    SEED_003,
    ClientFactory,
    bitfinex,
    cryptopos_body,
    cryptopos_data,
    cryptosteroid,
    encode,
    replace,
    token_for,
)

Client = TestClient[Any, Any]
BFX = "/v1/webhooks/bitfinex/order123"
POS = "/v1/webhooks/cryptopos"


async def post(
    client: Client,
    path: str,
    body: bytes | None = SEED_003,
    *,
    token: str | None = None,
    header: str | None = None,
    ctype: str | None = "application/json",
    method: str = "POST",
    chunked: bool = False,
) -> ClientResponse:
    headers: dict[str, str] = {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    if header is not None:
        headers["Token"] = header
    params = {"token": token} if token is not None else None
    data: Any = body
    if chunked and body is not None:

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        data = pieces()
    return await client.request(method, path, data=data, headers=headers, params=params)


async def error_of(response: ClientResponse) -> str:
    assert response.content_type == "application/json"
    payload = await response.json()
    assert set(payload) == {"error", "detail"}
    assert isinstance(payload["detail"], str)
    assert response.headers["X-Request-Id"]
    code: str = payload["error"]
    return code


def tok(client: Client, provider: str = "bitfinex", order: str = "order123") -> str:
    assert client.app is not None
    return token_for(client.app[SETTINGS], provider, order)


# --- 404 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/nowhere", "not_found"),
        ("POST", "/v1/webhooks/cryptopos/ORDER", "not_found"),
        ("POST", "/v1/webhooks/bitfinex", "not_found"),
        ("POST", "/v1/webhooks/bitfinex/a/b", "not_found"),
        ("POST", "/v1/webhooks/paypal/o-1", "unknown_provider"),
        ("POST", "/v1/webhooks/paypal", "unknown_provider"),
        # 404 before 405
        ("GET", "/v1/webhooks/paypal/o-1", "unknown_provider"),
        ("DELETE", "/v1/webhooks/cryptopos/ORDER", "not_found"),
    ],
)
async def test_not_found(offline_client: Client, method: str, path: str, code: str) -> None:
    response = await post(offline_client, path, b"{", method=method, ctype="text/plain")
    assert response.status == 404
    assert await error_of(response) == code


async def test_cryptopos_route_is_unknown_without_its_secret(
    app_client: ClientFactory, offline_settings: Settings
) -> None:
    client = await app_client(replace(offline_settings, cryptopos_secret=None))
    response = await post(client, POS, cryptopos_body())
    assert response.status == 404
    assert await error_of(response) == "unknown_provider"


# --- 405 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", BFX), ("PUT", "/v1/webhooks/cryptosteroid/o-1"), ("GET", POS), ("POST", "/healthz")],
)
async def test_method_not_allowed(offline_client: Client, method: str, path: str) -> None:
    big = b"x" * 100_000  # 405 before 413 and 415
    response = await post(offline_client, path, big, method=method, ctype="text/plain")
    assert response.status == 405
    assert await error_of(response) == "method_not_allowed"
    assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]


# --- 413 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BFX, POS])
async def test_payload_too_large_before_media_type_and_auth(
    offline_client: Client, path: str
) -> None:
    big = b"[" + b" " * 70_000 + b"]"
    for ctype in ("application/json", "text/plain", None):
        response = await post(offline_client, path, big, ctype=ctype)
        assert response.status == 413
        assert await error_of(response) == "payload_too_large"


async def test_a_chunked_body_is_read_once_authenticated_and_413_past_the_limit(
    offline_client: Client,
) -> None:
    """Its length is unknown until it is read: 415 and 401 come from the headers first."""
    big = b"[" + b" " * 70_000 + b"]"
    response = await post(offline_client, BFX, big, ctype="text/plain", chunked=True)
    assert (response.status, await error_of(response)) == (415, "unsupported_media_type")
    response = await post(offline_client, BFX, big, chunked=True)
    assert (response.status, await error_of(response)) == (401, "unauthorized")
    response = await post(offline_client, BFX, big, token=tok(offline_client), chunked=True)
    assert (response.status, await error_of(response)) == (413, "payload_too_large")
    # Crypto POS signs inside the body: its body is read (to the limit) to authenticate.
    response = await post(offline_client, POS, big, chunked=True)
    assert (response.status, await error_of(response)) == (413, "payload_too_large")


async def test_body_at_the_limit_is_not_too_large(
    app_client: ClientFactory, offline_settings: Settings
) -> None:
    client = await app_client(replace(offline_settings, max_body_bytes=len(SEED_003)))
    response = await post(client, BFX, SEED_003, token=tok(client))
    assert response.status == 503  # it got as far as publishing
    response = await post(client, BFX, SEED_003 + b" ", token=tok(client))
    assert response.status == 413


# --- 415 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_unsupported_media_type_before_auth(
    offline_client: Client, ctype: str | None
) -> None:
    response = await post(offline_client, BFX, SEED_003, ctype=ctype)  # no token either
    assert response.status == 415
    assert await error_of(response) == "unsupported_media_type"


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON"])
async def test_json_with_charset_is_accepted(offline_client: Client, ctype: str) -> None:
    response = await post(offline_client, BFX, SEED_003, ctype=ctype, token=tok(offline_client))
    assert response.status == 503


# --- 401 -------------------------------------------------------------------------------------


async def test_unauthorized_alike_for_missing_malformed_and_wrong(offline_client: Client) -> None:
    good = tok(offline_client)
    details = set()
    for presented in (
        None,
        "",
        "garbage",
        good + "=",
        tok(offline_client, order="order124"),
        tok(offline_client, provider="cryptosteroid"),
    ):
        response = await post(offline_client, BFX, b"not even json", token=presented)
        assert response.status == 401  # 401 before 400: the body is never parsed
        assert await error_of(response) == "unauthorized"
        details.add((await response.json())["detail"])
    assert len(details) == 1


async def test_token_header_or_query(offline_client: Client) -> None:
    path = "/v1/webhooks/cryptosteroid/order-42"
    body = encode(cryptosteroid())
    good = tok(offline_client, "cryptosteroid", "order-42")
    assert (await post(offline_client, path, body, header=good)).status == 503
    assert (await post(offline_client, path, body, token=good)).status == 503
    assert (await post(offline_client, path, body, header="k2.wrong")).status == 401


async def test_cryptopos_signature(offline_client: Client) -> None:
    body = cryptopos_body()
    assert (await post(offline_client, POS, body)).status == 503
    signature = json.loads(body)["signature"]
    upper = body.replace(signature.encode(), signature.upper().encode())
    assert (await post(offline_client, POS, upper)).status == 503
    for bad in (
        cryptopos_body(signature="0" * 64),
        cryptopos_body(secret=b"other-secret"),
        b'{"data": ' + json.dumps(cryptopos_data()).encode() + b"}",
        b'{"signature": 5, "data": {}}',
        b'{"signature": "abc"}',
        b"[]",
        # Signed over one spacing, sent with another: the exact bytes count.
        body.replace(b'"data": {\n  "client"', b'"data": {"client"'),
    ):
        response = await post(offline_client, POS, bad)
        assert response.status == 401, bad[:60]
        assert await error_of(response) == "unauthorized"


# --- 400 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        (b"{not json", "invalid_json", "malformed"),
        (b"", "invalid_json", ""),
        (encode(bitfinex(amount="lots")), "invalid_payload", "`$.amount`"),
        (encode(bitfinex(status="REFUNDED")), "invalid_payload", "`$.status`"),
        (encode(bitfinex(orderId="order999")), "order_mismatch", ""),
        (encode({k: v for k, v in bitfinex().items() if k != "orderId"}), "order_mismatch", ""),
    ],
)
async def test_bad_request_after_authentication(
    offline_client: Client, body: bytes, code: str, detail: str
) -> None:
    response = await post(offline_client, BFX, body, token=tok(offline_client))
    assert response.status == 400
    assert await error_of(response) == code
    assert detail in (await response.json())["detail"]


async def test_cryptosteroid_without_external_id_cannot_be_bound(offline_client: Client) -> None:
    path = "/v1/webhooks/cryptosteroid/order-42"
    body = encode(cryptosteroid(externalId=None))
    response = await post(
        offline_client, path, body, header=tok(offline_client, "cryptosteroid", "order-42")
    )
    assert response.status == 400
    assert await error_of(response) == "order_mismatch"


async def test_cryptopos_bad_requests(offline_client: Client) -> None:
    response = await post(offline_client, POS, b"<xml/>")  # not JSON: 400 even unsigned
    assert response.status == 400
    assert await error_of(response) == "invalid_json"
    response = await post(offline_client, POS, cryptopos_body(cryptopos_data(total="a lot")))
    assert response.status == 400
    assert await error_of(response) == "invalid_payload"
    assert "`$.data.total`" in (await response.json())["detail"]


# --- 429 -------------------------------------------------------------------------------------


async def test_rate_limit_replaces_401_past_the_budget(
    app_client: ClientFactory, offline_settings: Settings
) -> None:
    client = await app_client(replace(offline_settings, auth_failure_budget=3))
    statuses = [(await post(client, BFX, token="bad")).status for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    response = await post(client, POS, cryptopos_body(signature="0" * 64))
    assert await error_of(response) == "rate_limited"
    assert response.status == 429
    # Earlier faults keep their place before 429 ...
    assert (await post(client, BFX, ctype="text/plain")).status == 415
    assert (await post(client, BFX, b"x" * 70_000)).status == 413
    # ... and an authenticated request is never refused for rate.
    assert (await post(client, BFX, b"{", token=tok(client))).status == 400
    assert (await post(client, BFX, token=tok(client))).status == 503


async def test_authenticated_request_is_accepted_past_the_budget(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(replace(kafka_settings, auth_failure_budget=1))
    assert [(await post(client, BFX, token="x")).status for _ in range(2)] == [401, 429]
    response = await post(client, BFX, token=tok(client))
    assert response.status == 200
    assert (await response.json())["status"] == "accepted"


# --- 503, probes, metrics ------------------------------------------------------------------


async def test_unavailable_carries_retry_after(offline_client: Client) -> None:
    response = await post(offline_client, BFX, token=tok(offline_client))
    assert response.status == 503
    assert await error_of(response) == "unavailable"
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
async def test_probes_answer_head_and_refuse_post_with_allow(
    offline_client: Client, path: str
) -> None:
    assert (await offline_client.head(path)).status == 200
    response = await offline_client.post(path)
    assert response.status == 405
    assert await error_of(response) == "method_not_allowed"
    assert response.headers["Allow"] == "GET, HEAD"


async def test_probes_without_kafka(offline_client: Client) -> None:
    response = await offline_client.get("/healthz")
    assert response.status == 200
    response = await offline_client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] != "ready"


async def test_readyz_with_kafka_then_shutting_down(
    app_client: ClientFactory, kafka_settings: Settings
) -> None:
    client = await app_client(kafka_settings)
    assert client.app is not None
    registry = client.app[METRICS].registry
    # Set by start-up itself: where nothing polls /readyz (compose) the gauge is still right.
    assert registry.get_sample_value("payhook_ready") == 1
    assert (await client.get("/readyz")).status == 200
    await client.app.shutdown()  # what run_app does first on SIGTERM
    assert registry.get_sample_value("payhook_ready") == 0
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] == "shutting_down"


async def test_metrics_count_requests_by_provider_and_outcome(offline_client: Client) -> None:
    await post(offline_client, BFX, token="bad")
    await post(offline_client, BFX, token="bad")
    await post(offline_client, "/v1/webhooks/paypal/x")
    await post(offline_client, BFX, token=tok(offline_client))
    text = await (await offline_client.get("/metrics")).text()
    assert 'payhook_webhooks_total{outcome="unauthorized",provider="bitfinex"} 2.0' in text
    assert 'payhook_webhooks_total{outcome="unknown_provider",provider="unknown"} 1.0' in text
    assert (
        'payhook_http_request_duration_seconds_count{outcome="unavailable",provider="bitfinex"} 1.0'
        in text
    )
    assert 'payhook_publish_duration_seconds_count{outcome="failed"} 1.0' in text


# --- never a 500 ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def mutated_bitfinex() -> st.SearchStrategy[bytes]:
    keys = st.sampled_from([*bitfinex(), "payment.amount", "payment.updated_at"])

    def mutate(key: str, value: object) -> bytes:
        body = bitfinex()
        if key.startswith("payment."):
            body["payment"][key.split(".", 1)[1]] = value
        else:
            body[key] = value
        return json.dumps(body).encode()

    return st.builds(mutate, keys, json_values)


fuzz_bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | mutated_bitfinex()
    | st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000])
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=fuzz_bodies)
async def test_malformed_bodies_get_a_4xx_never_a_500(offline_client: Client, body: bytes) -> None:
    response = await post(offline_client, BFX, body, token=tok(offline_client))
    assert response.status in (400, 503), await response.text()
    if response.status == 400:
        assert await error_of(response) in ("invalid_json", "invalid_payload", "order_mismatch")
    pos_response = await post(offline_client, POS, body)
    assert pos_response.status in (400, 401, 429), await pos_response.text()
