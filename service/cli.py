"""The ``payhook`` command: serve, consume, recover, secret, topics, and the operator's
commands (settlement, dlq, spool, send-test; their code is in :mod:`service.commands`, imported
on use so that ``payhook --help`` stays fast)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from service import __version__
from service.commands import CommandFailed
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
    "recover notifications that never arrived, from the providers' own APIs: publishes, as "
    "events with origin 'recovery', what the store has not processed (Bitfinex invoices "
    "created within the lookback, the CryptoSteroid and Crypto POS invoices still open in the "
    "store). Without --once it sweeps every PAYHOOK_RECOVER_INTERVAL seconds and serves "
    "/metrics, /healthz and /readyz on PAYHOOK_RECOVER_PORT. A provider is swept only when "
    "all of its API settings are set; the store is only read"
)
_RECOVER_SETTINGS: Final = (
    *("PAYHOOK_BITFINEX_API_URL", "PAYHOOK_BITFINEX_API_KEY", "PAYHOOK_BITFINEX_API_SECRET"),
    "PAYHOOK_CRYPTOSTEROID_API_URL",
    "PAYHOOK_CRYPTOSTEROID_API_KEY",
    "PAYHOOK_CRYPTOSTEROID_MERCHANT_ID",
    *("PAYHOOK_CRYPTOPOS_API_URL", "PAYHOOK_CRYPTOPOS_API_KEY", "PAYHOOK_CRYPTOPOS_MERCHANT_ID"),
    *("PAYHOOK_RECOVER_INTERVAL", "PAYHOOK_RECOVER_LOOKBACK", "PAYHOOK_RECOVER_PORT"),
    *("PAYHOOK_STORE_URL", "PAYHOOK_KAFKA_BOOTSTRAP", "PAYHOOK_TOPIC_PREFIX"),
    *("PAYHOOK_KAFKA_IDEMPOTENCE", "PAYHOOK_HTTP_HOST", "PAYHOOK_COMMIT_TIMEOUT"),
    "PAYHOOK_LOG_FORMAT",
)


# The settings each command reads, with their defaults, for its --help.
_DEFAULTS: Final[dict[str, str]] = {
    "PAYHOOK_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "PAYHOOK_TOPIC_PREFIX": "payhook",
    "PAYHOOK_KAFKA_IDEMPOTENCE": "false",
    "PAYHOOK_HTTP_HOST": "127.0.0.1",
    "PAYHOOK_HTTP_PORT": "8080",
    "PAYHOOK_CONSUMER_PORT": "8081",
    "PAYHOOK_PUBLIC_URL": "http://PAYHOOK_HTTP_HOST:PAYHOOK_HTTP_PORT",
    "PAYHOOK_SIGNING_KEYS": "none, required",
    "PAYHOOK_MAX_BODY_BYTES": "65536",
    "PAYHOOK_AUTH_FAILURE_BUDGET": "20",
    "PAYHOOK_CRYPTOPOS_SECRET": "none: the Crypto POS route is off",
    "PAYHOOK_STORE_URL": "sqlite:///var/payhook.db",
    "PAYHOOK_SPOOL_DIR": "var/spool",
    "PAYHOOK_SPOOL_MAX_BYTES": "268435456",
    "PAYHOOK_PUBLISH_TIMEOUT": "2",
    "PAYHOOK_SHUTDOWN_TIMEOUT": "15",
    "PAYHOOK_LOG_FORMAT": "json",
    "PAYHOOK_CONSUMER_GROUP": "payhook-consumer",
    "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS": "10000",
    "PAYHOOK_CONSUMER_BATCH_MAX": "500",
    "PAYHOOK_COMMIT_TIMEOUT": "10",
    "PAYHOOK_BITFINEX_API_URL": "https://api.bitfinex.com",
    "PAYHOOK_BITFINEX_API_KEY": "none: Bitfinex is not swept",
    "PAYHOOK_BITFINEX_API_SECRET": "none: Bitfinex is not swept",
    "PAYHOOK_CRYPTOSTEROID_API_URL": "none: CryptoSteroid is not swept",
    "PAYHOOK_CRYPTOSTEROID_API_KEY": "none: CryptoSteroid is not swept",
    "PAYHOOK_CRYPTOSTEROID_MERCHANT_ID": "none: CryptoSteroid is not swept",
    "PAYHOOK_CRYPTOPOS_API_URL": "none: Crypto POS is not swept",
    "PAYHOOK_CRYPTOPOS_API_KEY": "none: Crypto POS is not swept",
    "PAYHOOK_CRYPTOPOS_MERCHANT_ID": "none: Crypto POS is not swept",
    "PAYHOOK_RECOVER_INTERVAL": "300",
    "PAYHOOK_RECOVER_LOOKBACK": "172800",
    "PAYHOOK_RECOVER_PORT": "8082",
    "PAYHOOK_TOPIC_PARTITIONS": "4, at creation only",
    "PAYHOOK_TOPIC_REPLICATION": "min(3, brokers)",
    "PAYHOOK_EVENTS_RETENTION_MS": "2592000000 (30 days)",
}
_KAFKA: Final = ("PAYHOOK_KAFKA_BOOTSTRAP", "PAYHOOK_TOPIC_PREFIX")
_TOPIC_SETTINGS: Final = (
    "PAYHOOK_TOPIC_PARTITIONS",
    "PAYHOOK_TOPIC_REPLICATION",
    "PAYHOOK_EVENTS_RETENTION_MS",
)


def _reads(*names: str) -> str:
    listed = "; ".join(f"{name} (default: {_DEFAULTS[name]})" for name in names)
    return f"Settings read: {listed}."


def _add(
    commands: Any, name: str, summary: str, settings: Sequence[str], description: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=f"{description or summary}. {_reads(*settings)}",
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payhook", description=_DESCRIPTION, epilog=_EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"payhook {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add(
        commands,
        "serve",
        "run the HTTP ingest service",
        (
            *_KAFKA,
            "PAYHOOK_KAFKA_IDEMPOTENCE",
            "PAYHOOK_HTTP_HOST",
            "PAYHOOK_HTTP_PORT",
            "PAYHOOK_PUBLIC_URL",
            "PAYHOOK_SIGNING_KEYS",
            "PAYHOOK_MAX_BODY_BYTES",
            "PAYHOOK_AUTH_FAILURE_BUDGET",
            "PAYHOOK_CRYPTOPOS_SECRET",
            "PAYHOOK_SPOOL_DIR",
            "PAYHOOK_SPOOL_MAX_BYTES",
            "PAYHOOK_PUBLISH_TIMEOUT",
            "PAYHOOK_SHUTDOWN_TIMEOUT",
            "PAYHOOK_LOG_FORMAT",
        ),
    )
    _add(
        commands,
        "consume",
        "run the reconciling consumer",
        (
            *_KAFKA,
            "PAYHOOK_KAFKA_IDEMPOTENCE",
            "PAYHOOK_STORE_URL",
            "PAYHOOK_CONSUMER_PORT",
            "PAYHOOK_HTTP_HOST",
            "PAYHOOK_CONSUMER_GROUP",
            "PAYHOOK_CONSUMER_SESSION_TIMEOUT_MS",
            "PAYHOOK_CONSUMER_BATCH_MAX",
            "PAYHOOK_COMMIT_TIMEOUT",
            "PAYHOOK_SHUTDOWN_TIMEOUT",
            "PAYHOOK_LOG_FORMAT",
        ),
        "run the reconciling consumer; it creates or migrates the store's schema at start-up",
    )
    _add(
        commands,
        "topics",
        "create the Kafka topics that are missing, with their settings; an existing topic whose "
        "settings differ is reported on stderr and left unchanged",
        (*_KAFKA, *_TOPIC_SETTINGS),
    )
    _add_operator_commands(commands)
    recover = _add(
        commands,
        "recover",
        "recover notifications that never arrived, from the providers' own APIs",
        _RECOVER_SETTINGS,
        _RECOVER_DESCRIPTION,
    )
    recover.add_argument(
        "--once",
        action="store_true",
        help="one sweep of every configured provider, a summary line each; exit 0 when every "
        "sweep succeeded, 1 when one failed, 2 when no provider is configured",
    )
    secret = _add(
        commands,
        "secret",
        "print an order's secret and the webhook URL to give the provider",
        ("PAYHOOK_SIGNING_KEYS", "PAYHOOK_PUBLIC_URL", "PAYHOOK_HTTP_HOST", "PAYHOOK_HTTP_PORT"),
    )
    secret.add_argument("--provider", required=True, choices=list(PROVIDERS))
    secret.add_argument("order_id")
    return parser


_EXIT_CODES: Final = (
    "Exit codes: 0 done; 1 the command ran and found a problem (an unknown invoice, a store or "
    "broker that does not answer, a spool left non-empty, a test notification not accepted); "
    "2 a usage or settings error (the message names what to fix)."
)


def _add_operator_commands(commands: Any) -> None:
    settlement = _add(
        commands,
        "settlement",
        "print an invoice's stored settlement as JSON (as on the settlements topic)",
        ("PAYHOOK_STORE_URL",),
        "print the stored Settlement of an invoice as one JSON line, the same JSON as on the "
        "settlements topic (the store is opened read-only); --history: every stored version, "
        "oldest first; --order ORDER_ID: every invoice of that order. Exit 1 when unknown",
    )
    settlement.add_argument("provider", nargs="?", help=f"one of {', '.join(PROVIDERS)}")
    settlement.add_argument("invoice_id", nargs="?")
    settlement.add_argument("--history", action="store_true", help="every stored version")
    settlement.add_argument("--order", metavar="ORDER_ID", help="every invoice of this order")

    dlq = commands.add_parser(
        "dlq",
        help="list or redrive the dead-letter topic",
        description="the records the consumer could not process. " + _reads(*_KAFKA),
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = _add(
        dlq_commands,
        "list",
        "list the DLQ records",
        _KAFKA,
        "a line per record of the DLQ topic, read from the start: partition, offset, key, "
        "error, and whether it was redriven",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per record")
    redrive = _add(
        dlq_commands,
        "redrive",
        "put the DLQ records not redriven before back onto the events topic",
        (*_KAFKA, "PAYHOOK_KAFKA_IDEMPOTENCE"),
        "put each DLQ record not redriven before back onto the events topic (original key "
        "and bytes, header redriven-from = partition:offset, acks=all); the position is "
        "committed to the consumer group payhook-dlq-redrive after each acknowledged batch, so "
        "a record is redriven once (killed mid-way, a record may be repeated, never skipped)",
    )
    redrive.add_argument("--dry-run", action="store_true", help="say what would move; move none")

    spool = commands.add_parser(
        "spool",
        help="inspect or drain a serve's local spool",
        description="the local spool where serve keeps events Kafka has not acknowledged",
    )
    spool_commands = spool.add_subparsers(dest="spool_command", required=True)
    status = _add(
        spool_commands,
        "status",
        "depth, bytes and oldest age of a spool (read-only, also while serve runs)",
        ("PAYHOOK_SPOOL_DIR",),
        "depth, bytes and oldest age of a spool, read-only (also while serve runs); exit 0 "
        "whenever the spool can be read, whatever its depth",
    )
    status.add_argument("dir", nargs="?", help="the spool directory (default PAYHOOK_SPOOL_DIR)")
    status.add_argument("--json", action="store_true", help="one JSON object")
    drain = _add(
        spool_commands,
        "drain",
        "empty a spool left by a stopped serve into Kafka",
        (*_KAFKA, "PAYHOOK_KAFKA_IDEMPOTENCE", "PAYHOOK_PUBLISH_TIMEOUT"),
        "empty a spool left behind by a stopped serve (e.g. the volume of a removed pod) into "
        "the events topic, in order, acks=all; refuses a spool a live serve holds; exit 0 only "
        "when it is empty (with Kafka unreachable the spool is left intact, exit 1)",
    )
    drain.add_argument("dir", help="the spool directory")

    send_test = _add(
        commands,
        "send-test",
        "post a realistic signed test notification to the deployment and print its answer",
        ("PAYHOOK_PUBLIC_URL", "PAYHOOK_SIGNING_KEYS", "PAYHOOK_CRYPTOPOS_SECRET"),
        "post a realistic signed notification of a provider (invoice id payhook-test-...) to "
        "PAYHOOK_PUBLIC_URL and print the answer; exit 0 on 200",
    )
    send_test.add_argument("--provider", required=True, help=f"one of {', '.join(PROVIDERS)}")
    send_test.add_argument(
        "--status", default="completed", choices=["completed", "expired", "partial"]
    )
    send_test.add_argument(
        "--order", metavar="ORDER_ID", help="the order id (default: payhook-test-order)"
    )


def _operator_logging(log_format: str) -> None:
    """What the libraries log goes to stderr, warnings and worse only: stdout is the
    command's own output (JSON lines for scripts among it)."""
    from service.logs import configure_logging

    configure_logging(log_format, logging.WARNING, cache=False)
    # The Kafka client logs every failed connection; the command reports the failure itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _provider(name: str) -> str:
    if name not in PROVIDERS:
        raise CommandFailed(f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}", code=2)
    return name


def _settlement(args: argparse.Namespace) -> int:
    command = importlib.import_module("service.commands.settlement")
    if args.order is not None:
        if args.provider is not None or args.history:
            raise CommandFailed("--order ORDER_ID takes no PROVIDER, INVOICE_ID or --history", 2)
        return int(command.run(load_settings(require_signing_keys=False), order_id=args.order))
    if args.provider is None or args.invoice_id is None:
        raise CommandFailed("give PROVIDER INVOICE_ID, or --order ORDER_ID", code=2)
    return int(
        command.run(
            load_settings(require_signing_keys=False),
            provider=_provider(args.provider),
            invoice_id=args.invoice_id,
            history=args.history,
        )
    )


def _dlq(args: argparse.Namespace) -> int:
    command = importlib.import_module("service.commands.dlq")
    settings = load_settings(require_signing_keys=False)
    _operator_logging(settings.log_format)
    if args.dlq_command == "list":
        return int(command.list_records(settings, as_json=args.json))
    return int(command.redrive(settings, dry_run=args.dry_run))


def _spool(args: argparse.Namespace) -> int:
    command = importlib.import_module("service.commands.spool")
    settings = load_settings(require_signing_keys=False)
    _operator_logging(settings.log_format)
    if args.spool_command == "status":
        directory = Path(args.dir) if args.dir else settings.spool_dir
        return int(command.status(directory, as_json=args.json))
    return int(command.drain(settings, Path(args.dir)))


def _send_test(args: argparse.Namespace) -> int:
    command = importlib.import_module("service.commands.send_test")
    provider = _provider(args.provider)
    settings = load_settings(require_signing_keys=provider in PER_ORDER)
    return int(command.run(settings, provider, status=args.status, order_id=args.order))


def _secret(provider: str, order_id: str) -> int:
    # Inside the command: a shared module loads a process's package only when it runs.
    from service.ingest.secrets import mint_secret, webhook_url

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
    from service.kafka import ensure_topics, topic_drift

    settings = load_settings(require_signing_keys=False)
    results = asyncio.run(ensure_topics(settings))
    failed = 0
    for topic, problem in results.items():
        if problem is None:
            print(f"{topic}: ok")
        else:
            failed += 1
            print(f"{topic}: {problem}", file=sys.stderr)
    if failed:
        return 1
    # An existing topic is never changed behind the operator's back: its differences are said.
    for topic, drift in asyncio.run(topic_drift(settings)).items():
        print(f"{topic}: settings differ (left unchanged): {'; '.join(drift)}", file=sys.stderr)
    return 0


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
            case "settlement":
                return _settlement(args)
            case "dlq":
                return _dlq(args)
            case "spool":
                return _spool(args)
            case "send-test":
                return _send_test(args)
    except SettingsError as exc:
        print(f"payhook: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"payhook: {exc}", file=sys.stderr)
        return exc.code
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
