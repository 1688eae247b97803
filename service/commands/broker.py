"""What the commands that talk to Kafka (dlq, spool) share: the topics made ready first, and
one wording for a broker that does not answer."""

from __future__ import annotations

from service.commands import CommandFailed
from service.kafka import ensure_topics
from service.settings import Settings


def unreachable(settings: Settings, reason: str) -> CommandFailed:
    return CommandFailed(
        f"cannot reach Kafka at {settings.kafka_bootstrap}: {reason} "
        "(check PAYHOOK_KAFKA_BOOTSTRAP)"
    )


async def require_topics(settings: Settings, within: float) -> None:
    """Creates the topics if they are missing; CommandFailed when they cannot be created or
    seen within ``within`` seconds."""
    problems = [p for p in (await ensure_topics(settings, within)).values() if p]
    if problems:
        raise CommandFailed(f"{problems[0]} (check PAYHOOK_KAFKA_BOOTSTRAP)")
