import base64

import pytest

from service.settings import Secret, SettingsError, load_settings

KEY = base64.b64encode(b"x" * 32).decode()


def test_defaults_follow_the_contract() -> None:
    s = load_settings({"PAYHOOK_SIGNING_KEYS": f"a:{KEY}"})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert (s.http_host, s.http_port, s.consumer_port) == ("127.0.0.1", 8080, 8081)
    assert s.max_body_bytes == 65536
    assert s.auth_failure_budget == 20
    assert s.cryptopos_secret is None
    assert s.store_url == "sqlite:///var/payhook.db"
    assert s.topics == (
        "payhook.invoice-events.v1",
        "payhook.settlements.v1",
        "payhook.invoice-events.dlq.v1",
    )


def test_signing_keys_are_required_and_first_mints() -> None:
    with pytest.raises(SettingsError, match="PAYHOOK_SIGNING_KEYS"):
        load_settings({})
    s = load_settings({"PAYHOOK_SIGNING_KEYS": f"new:{KEY}, old:{KEY}"})
    assert [k.kid for k in s.signing_keys] == ["new", "old"]


@pytest.mark.parametrize(
    "raw", ["nokid", "a:!!notbase64!!", "a:" + base64.b64encode(b"x").decode()]
)
def test_malformed_keys_fail_fast(raw: str) -> None:
    with pytest.raises(SettingsError, match="PAYHOOK_SIGNING_KEYS"):
        load_settings({"PAYHOOK_SIGNING_KEYS": raw})


def test_consumer_may_run_without_keys() -> None:
    assert load_settings({}, require_signing_keys=False).signing_keys == ()


def test_secrets_never_print() -> None:
    s = load_settings({"PAYHOOK_SIGNING_KEYS": f"a:{KEY}", "PAYHOOK_CRYPTOPOS_SECRET": "hunter2"})
    text = repr(s) + str(s)
    assert "hunter2" not in text
    assert KEY not in text
    assert repr(b"x" * 32) not in text
    assert isinstance(s.cryptopos_secret, Secret)
    assert s.cryptopos_secret.reveal() == b"hunter2"


def test_bad_numbers_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="PAYHOOK_HTTP_PORT"):
        load_settings({"PAYHOOK_SIGNING_KEYS": f"a:{KEY}", "PAYHOOK_HTTP_PORT": "http"})


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        (None, None, "http://127.0.0.1:8080"),
        (None, "18080", "http://127.0.0.1:18080"),
        ("0.0.0.0", "9000", "http://127.0.0.1:9000"),
        ("::", "9000", "http://127.0.0.1:9000"),
        ("localhost", "9000", "http://localhost:9000"),
        ("::1", "9000", "http://[::1]:9000"),
    ],
)
def test_public_url_defaults_to_the_configured_http_address(
    host: str | None, port: str | None, url: str
) -> None:
    env = {"PAYHOOK_SIGNING_KEYS": f"a:{KEY}"}
    if host is not None:
        env["PAYHOOK_HTTP_HOST"] = host
    if port is not None:
        env["PAYHOOK_HTTP_PORT"] = port
    assert load_settings(env).public_url == url


def test_public_url_set_explicitly_wins() -> None:
    env = {
        "PAYHOOK_SIGNING_KEYS": f"a:{KEY}",
        "PAYHOOK_HTTP_PORT": "18080",
        "PAYHOOK_PUBLIC_URL": "https://pay.example.com/",
    }
    assert load_settings(env).public_url == "https://pay.example.com"
