"""``payhook send-test`` against a running ingest app and the real broker: each provider's
realistic, signed notification is accepted, and what reaches the topic is a test."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import msgspec
import pytest

from schemas.events import InvoiceEvent
from service.providers import PROVIDERS
from service.providers.samples import SampleStatus
from service.settings import Settings
from tests.commands.conftest import Payhook, env_of
from tests.fixtures_app import ClientFactory
from tests.fixtures_consume import read_topic

EXPECTED: list[tuple[str, SampleStatus, str, str]] = [
    ("bitfinex", "completed", "completed", "COMPLETED"),
    ("bitfinex", "partial", "pending", "PENDING"),
    ("bitfinex", "expired", "expired", "EXPIRED"),
    ("cryptosteroid", "completed", "completed", "PAID"),
    ("cryptosteroid", "partial", "pending", "WAITING"),
    ("cryptosteroid", "expired", "expired", "EXPIRED"),
    ("cryptopos", "completed", "completed", "completed"),
    ("cryptopos", "partial", "pending", "partial"),
]


def test_every_provider_has_a_sample_its_own_code_accepts() -> None:
    """A fourth provider must bring its own sample: the registry asks each one."""
    now = datetime.now(UTC)
    for name, status, event_status, _ in EXPECTED:
        provider = PROVIDERS[name]
        body = provider.sample(status, "payhook-test-x", "o-1", now)
        event = provider.normalize(provider.decode(body), now)
        assert event.status == event_status
        assert event.invoice_id == "payhook-test-x"
        assert event.order_id == "o-1"


async def test_each_provider_and_status_is_accepted_and_marked_as_a_test(
    kafka_settings: Settings, app_client: ClientFactory, payhook: Payhook
) -> None:
    client = await app_client(kafka_settings)
    settings = dataclasses.replace(kafka_settings, public_url=str(client.make_url("")).rstrip("/"))
    answers: dict[str, tuple[str, str]] = {}
    for provider, status, _, _ in EXPECTED:
        ran = await payhook(
            env_of(settings),
            "send-test",
            "--provider",
            provider,
            "--status",
            status,
            "--order",
            "o-7",
        )
        assert ran.code == 0, ran
        # The app in this process logs its request line to the same stdout first.
        post, about, answer = ran.out.splitlines()[-3:]
        assert post.startswith(f"POST {settings.public_url}/v1/webhooks/{provider}")
        assert about.startswith(f"provider {provider}, status {status}, order o-7, invoice ")
        assert "token" not in ran.out  # Bitfinex's secret rides in the URL: never printed
        assert answer.startswith("200 ")
        event_id = msgspec.json.decode(answer.removeprefix("200 "))["event_id"]
        answers[event_id] = (provider, status)
    records = await read_topic(settings, settings.events_topic, lambda r: len(r) >= len(EXPECTED))
    events = [msgspec.json.decode(r.value, type=InvoiceEvent) for r in records]
    assert {e.event_id for e in events} == set(answers)
    seen = set()
    for e in events:
        assert e.invoice_id.startswith("payhook-test-")
        assert e.order_id == "o-7"
        seen.add((e.provider, answers[e.event_id][1], e.status, e.provider_status))
    assert seen == set(EXPECTED)


async def test_default_status_is_completed_and_order_is_a_test_order(
    kafka_settings: Settings, app_client: ClientFactory, payhook: Payhook
) -> None:
    client = await app_client(kafka_settings)
    settings = dataclasses.replace(kafka_settings, public_url=str(client.make_url("")).rstrip("/"))
    ran = await payhook(env_of(settings), "send-test", "--provider", "cryptosteroid")
    assert ran.code == 0, ran
    [record] = await read_topic(settings, settings.events_topic, lambda r: len(r) >= 1)
    event = msgspec.json.decode(record.value, type=InvoiceEvent)
    assert (event.status, event.order_id) == ("completed", "payhook-test-order")


async def test_a_refused_notification_exits_1_with_the_answer(
    kafka_settings: Settings, app_client: ClientFactory, payhook: Payhook
) -> None:
    """The deployment's keys differ from the operator's: the answer says 401, exit 1."""
    client = await app_client(kafka_settings)
    env = env_of(
        kafka_settings,
        PAYHOOK_PUBLIC_URL=str(client.make_url("")).rstrip("/"),
        PAYHOOK_SIGNING_KEYS="other:" + "b" * 44,
    )
    ran = await payhook(env, "send-test", "--provider", "bitfinex")
    assert ran.code == 1
    assert [x for x in ran.out.splitlines() if x.startswith("401 ")]


@pytest.mark.parametrize(
    ("change", "args", "code", "says"),
    [
        ({"PAYHOOK_SIGNING_KEYS": ""}, ("--provider", "bitfinex"), 2, "PAYHOOK_SIGNING_KEYS"),
        ({"PAYHOOK_CRYPTOPOS_SECRET": ""}, ("--provider", "cryptopos"), 2, "CRYPTOPOS_SECRET"),
        ({}, ("--provider", "paypal"), 2, "unknown provider 'paypal'"),
        ({}, ("--provider", "cryptopos", "--status", "expired"), 2, "no callback"),
        (
            {"PAYHOOK_PUBLIC_URL": "http://{unreachable}"},
            ("--provider", "cryptosteroid"),
            1,
            "PAYHOOK_PUBLIC_URL",
        ),
    ],
)
async def test_bad_input_is_one_line_naming_what_to_fix(
    kafka_settings: Settings,
    payhook: Payhook,
    unreachable: str,
    change: dict[str, str],
    args: tuple[str, ...],
    code: int,
    says: str,
) -> None:
    change = {k: v.format(unreachable=unreachable) for k, v in change.items()}
    env = {k: v for k, v in {**env_of(kafka_settings), **change}.items() if v}
    ran = await payhook(env, "send-test", *args)
    assert ran.code == code, ran
    assert says in ran.err
    assert len(ran.err.splitlines()) == 1, ran.err
    assert "Traceback" not in ran.err


def test_help_names_the_settings_it_reads_with_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli import main

    with pytest.raises(SystemExit):
        main(["send-test", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "PAYHOOK_PUBLIC_URL (default:" in out
    assert "PAYHOOK_SIGNING_KEYS (default:" in out
