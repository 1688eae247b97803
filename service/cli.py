"""The ``payhook`` command: serve, consume, recover, secret, topics."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from service import __version__
from service.ingest.secrets import mint_secret, webhook_url
from service.providers import MERCHANT_SIGNED, PER_ORDER, PROVIDERS
from service.settings import SettingsError, load_settings

_MERCHANT_SIGNED_NOTE = (
    "payhook: {title} has no per-order secret: it signs every callback with the merchant "
    "secret ({setting}). Register {url}/v1/webhooks/{name} as the merchant's "
    "callback URL instead.\n"
)


_DESCRIPTION = (
    "payhook: webhook ingestion and reconciliation for crypto payment providers. "
    "Settings come from PAYHOOK_* environment variables (see the README)."
)


_RECOVER_DESCRIPTION = (
    "Reads the providers' APIs and publishes, as events with origin 'recovery', what the store "
    "has not processed: Bitfinex invoices created within the lookback, and the CryptoSteroid "
    "and Crypto POS invoices still open in the store. Without --once it sweeps every "
    "PAYHOOK_RECOVER_INTERVAL seconds and serves /metrics, /healthz and /readyz on "
    "PAYHOOK_RECOVER_PORT. Settings: PAYHOOK_BITFINEX_API_URL, PAYHOOK_BITFINEX_API_KEY, "
    "PAYHOOK_BITFINEX_API_SECRET, PAYHOOK_CRYPTOSTEROID_API_URL, PAYHOOK_CRYPTOSTEROID_API_KEY, "
    "PAYHOOK_CRYPTOSTEROID_MERCHANT_ID, PAYHOOK_CRYPTOPOS_API_URL, PAYHOOK_CRYPTOPOS_API_KEY, "
    "PAYHOOK_CRYPTOPOS_MERCHANT_ID (a provider is swept only when all of its are set), "
    "PAYHOOK_RECOVER_INTERVAL, PAYHOOK_RECOVER_LOOKBACK, PAYHOOK_RECOVER_PORT, "
    "PAYHOOK_STORE_URL (read only), PAYHOOK_KAFKA_BOOTSTRAP, PAYHOOK_TOPIC_PREFIX, "
    "PAYHOOK_LOG_FORMAT."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payhook", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"payhook {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP ingest service")
    commands.add_parser("consume", help="run the reconciling consumer")
    commands.add_parser("topics", help="create the Kafka topics that are missing")
    recover = commands.add_parser(
        "recover",
        help="recover notifications that never arrived, from the providers' own APIs",
        description=_RECOVER_DESCRIPTION,
    )
    recover.add_argument(
        "--once",
        action="store_true",
        help="one sweep of every configured provider, a summary line each; exit 0 when every "
        "sweep succeeded, 1 when one failed, 2 when no provider is configured",
    )
    secret = commands.add_parser(
        "secret", help="print an order's secret and the webhook URL to give the provider"
    )
    secret.add_argument("--provider", required=True, choices=list(PROVIDERS))
    secret.add_argument("order_id")
    return parser


def _secret(provider: str, order_id: str) -> int:
    settings = load_settings()
    per_order = PER_ORDER.get(provider)
    if per_order is None:
        signed = MERCHANT_SIGNED[provider]
        note = _MERCHANT_SIGNED_NOTE.format(
            title=signed.title,
            setting=signed.secret_setting,
            url=settings.public_url,
            name=provider,
        )
        sys.stderr.write(note)
        return 2
    print(f"secret: {mint_secret(settings.signing_keys, provider, order_id)}")
    print(f"url: {webhook_url(settings, provider, order_id)}")
    print(per_order.registration_hint)
    return 0


def _topics() -> int:
    from service.kafka import ensure_topics

    settings = load_settings(require_signing_keys=False)
    results = asyncio.run(ensure_topics(settings))
    failed = 0
    for topic, problem in results.items():
        if problem is None:
            print(f"{topic}: ok")
        else:
            failed += 1
            print(f"{topic}: {problem}", file=sys.stderr)
    return 1 if failed else 0


def _serve() -> int:
    from service.ingest.server import serve

    serve(load_settings())
    return 0


def _consume() -> int:
    # Imported on use: the consumer's dependencies (store drivers) stay out of the other verbs.
    consume = importlib.import_module("service.consume.process")
    return int(consume.run(load_settings(require_signing_keys=False)))


def _recover(once: bool) -> int:
    # Imported on use, like the consumer: its dependencies stay out of the other verbs.
    recover = importlib.import_module("service.recover.process")
    return int(recover.run(load_settings(require_signing_keys=False), once_only=once))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        match args.command:
            case "secret":
                return _secret(args.provider, args.order_id)
            case "topics":
                return _topics()
            case "serve":
                return _serve()
            case "consume":
                return _consume()
            case "recover":
                return _recover(args.once)
    except SettingsError as exc:
        print(f"payhook: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
