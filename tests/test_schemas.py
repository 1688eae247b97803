"""The generated JSON Schemas and OpenAPI document: current, valid, and as strict as the
contract says (a standard validator with format checking refuses a malformed amount or time)."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from schemas import generate, openapi
from schemas.events import InvoiceEvent, Settlement
from schemas.http import Accepted, Error, ErrorCode
from service import errors
from service.consume.reconcile import apply
from service.providers.bitfinex import BITFINEX
from service.providers.cryptopos import CRYPTOPOS
from service.providers.cryptopos import split as split_cryptopos
from service.providers.cryptosteroid import CRYPTOSTEROID
from tests.fixtures_app import SEED_003, cryptopos_body, cryptosteroid, encode
from tests.fixtures_consume import schema_validator

NOW = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)


def sample_events() -> list[InvoiceEvent]:
    _, data = split_cryptopos(cryptopos_body())
    return [
        BITFINEX.normalize(BITFINEX.decode(SEED_003), NOW),
        CRYPTOSTEROID.normalize(CRYPTOSTEROID.decode(encode(cryptosteroid())), NOW),
        CRYPTOPOS.normalize(CRYPTOPOS.decode(data), NOW),
    ]


def as_json(value: msgspec.Struct) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(msgspec.json.encode(value))
    return document


def test_checked_in_files_are_current() -> None:
    for name, render in generate.FILES.items():
        path = generate.HERE / name
        assert path.read_bytes() == render(), f"{name} is stale: run `make schemas`"


def test_event_schemas_are_draft_2020_12_with_ids_and_no_custom_format() -> None:
    for name in generate.EVENT_FILES:
        schema = json.loads((generate.HERE / name).read_bytes())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == "urn:payhook:schema:" + name.removesuffix(".json")
        assert b'"decimal"' not in (generate.HERE / name).read_bytes()


def test_published_records_validate_with_format_checking() -> None:
    events = schema_validator("invoice-event.v1.json")
    settlements = schema_validator("settlement.v1.json")
    for event in sample_events():
        events.validate(as_json(event))
        settlement = apply(None, event, NOW).state.settlement
        settlements.validate(as_json(settlement))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", "not a number"),
        ("amount", "1E-8"),  # an exponent: the contract writes amounts out in plain notation
        ("amount", "1.0E-8"),
        ("amount", ".5"),
        ("amount", "١٢٣"),  # other scripts' digits
        ("amount", 2.5),  # a JSON number, not a decimal string
        ("occurred_at", "yesterday"),
        ("occurred_at", "2021-01-06 21:16:28"),  # no offset, no T
        ("received_at", "2021-13-06T21:16:28Z"),
    ],
)
def test_a_malformed_amount_or_time_is_refused(field: str, value: object) -> None:
    record = as_json(sample_events()[0])
    record[field] = value
    assert not schema_validator("invoice-event.v1.json").is_valid(record)


def test_a_malformed_payment_amount_in_a_settlement_is_refused() -> None:
    record = as_json(apply(None, sample_events()[0], NOW).state.settlement)
    assert record["payments"]
    record["payments"][0]["amount"] = "-1E-8"
    assert not schema_validator("settlement.v1.json").is_valid(record)
    record["payments"][0]["amount"] = "-0.00000001"
    schema_validator("settlement.v1.json").validate(record)


def test_the_structs_refuse_a_naive_time_the_schemas_would_refuse() -> None:
    record = as_json(sample_events()[0])
    record["occurred_at"] = "2021-01-06T21:16:28"
    with pytest.raises(msgspec.ValidationError, match="occurred_at"):
        msgspec.json.decode(json.dumps(record), type=InvoiceEvent)
    settlement = apply(None, sample_events()[0], NOW).state.settlement
    text = msgspec.json.encode(settlement).replace(b'Z"', b'"')
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        msgspec.json.decode(text, type=Settlement)


def test_openapi_document_is_valid_openapi_3_1() -> None:
    document = json.loads((generate.HERE / "openapi.json").read_bytes())
    assert document["openapi"] == "3.1.0"
    validate_openapi(document)


def test_openapi_names_every_route_status_and_security_scheme() -> None:
    document = openapi.openapi()
    paths = document["paths"]
    assert set(paths) == {
        "/v1/webhooks/bitfinex/{order_id}",
        "/v1/webhooks/cryptosteroid/{order_id}",
        "/v1/webhooks/cryptopos",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    for path in ("/v1/webhooks/bitfinex/{order_id}", "/v1/webhooks/cryptosteroid/{order_id}"):
        post = paths[path]["post"]
        assert post["security"] == [{"tokenHeader": []}, {"tokenQuery": []}]
    bodies = {
        path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, ops in paths.items()
        if "post" in ops
    }
    assert sorted(ref.rsplit("/", 1)[1] for ref in bodies.values()) == [
        "BitfinexWebhook",
        "CryptoPosCallback",
        "CryptoSteroidInvoice",
    ]
    for ops in paths.values():
        if "post" in ops:
            assert set(ops["post"]["responses"]) == {
                "200", "400", "401", "404", "405", "413", "415", "429", "503"
            }  # fmt: skip
    schemes = document["components"]["securitySchemes"]
    assert (schemes["tokenHeader"]["in"], schemes["tokenHeader"]["name"]) == ("header", "Token")
    assert (schemes["tokenQuery"]["in"], schemes["tokenQuery"]["name"]) == ("query", "token")
    envelope = document["components"]["schemas"]["CryptoPosCallback"]["properties"]
    assert envelope["data"] == {"$ref": "#/components/schemas/CryptoPosInvoice"}


def test_every_error_code_the_service_answers_is_described() -> None:
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.PayhookError) and cls.answered
    }
    codes.discard(errors.PayhookError.code)  # "internal": never for anything a client sends
    assert codes <= set(typing.get_args(ErrorCode))
    described: set[str] = set()
    for response in openapi.openapi()["components"]["responses"].values():
        schema = response["content"]["application/json"]["schema"]
        described.update(schema["allOf"][1]["properties"]["error"]["enum"])
    assert described == set(typing.get_args(ErrorCode))


def test_response_structs_decode_what_the_app_writes() -> None:
    accepted = msgspec.json.decode(b'{"status":"accepted","event_id":"e1"}', type=Accepted)
    assert accepted.event_id == "e1"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"error":"internal","detail":"x"}', type=Error)


def test_provider_amounts_accept_numbers_and_decimal_strings() -> None:
    schema = {"$schema": generate.DRAFT, **openapi.provider_decimal()}
    check = Draft202012Validator(schema)
    for good in (2.5, "0.00006262", "1e2", "-1", "0.50", "1.0E-8"):
        assert check.is_valid(good), good
    # JSON's own number syntax in a string (as ingest reads it): no "5.", "+5", "007" or ".5".
    bad_ones = ("NaN", "Infinity", " 5 ", "1_000", "\uff11\uff12\uff13", "0x10", "", "5.", "+5")
    for bad in (*bad_ones, "007", ".5", "\u0661\u0662\u0663"):
        assert not check.is_valid(bad), bad
