"""One recovery sweep: read each configured provider's API, publish what the store has not seen.

Bitfinex is discovered (every invoice created within the lookback is listed); CryptoSteroid and
Crypto POS are refreshed (each invoice the store holds in a state whose amounts can still move,
updated within the lookback, is re-read). Every object read becomes an ``InvoiceEvent`` with
``origin: "recovery"`` through the provider's own decoding and normalization, so the same facts
have the same ``event_id`` as their webhook; only events whose id the store has not processed
are published, so a quiet sweep publishes nothing. The consumer does the rest.

A provider's sweep fails (and says why) when a window or an invoice could not be read whole
after its retries, when the provider refuses the credentials, or when publishing fails; what
was read whole is still published, since each event stands on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol, final

import structlog

from schemas.events import InvoiceEvent, Provider
from service.providers.api import ApiError, CredentialsRejected, StatusApi
from service.providers.bitfinex import BitfinexApi

log = structlog.get_logger("payhook.recover")

# Settlement states whose amounts can still move (DESIGN.md, Recovery; rule 5).
REFRESH_STATES: Final = ("awaiting_payment", "partially_paid", "underpaid", "expired_underpaid")
# Status reads in flight at once per refreshed provider: their limits are not documented.
REFRESH_CONCURRENCY: Final = 4
_SHOWN_ERRORS: Final = 5


class StoreView(Protocol):
    """What a sweep reads from the consumer's store (never writes)."""

    async def processed_event_ids(self, keys: Collection[str]) -> dict[str, frozenset[str]]:
        """The event ids applied to each invoice key the store holds."""
        ...

    async def refreshable(
        self, provider: str, states: Collection[str], since: datetime
    ) -> list[str]:
        """Invoice ids of ``provider`` in one of ``states`` whose settlement was updated at or
        after ``since``."""
        ...


class PublishFailed(RuntimeError):
    """The broker did not acknowledge (``acks=all``) every event of a sweep."""


# Publishes with acks=all, or raises PublishFailed.
Publish = Callable[[Sequence[InvoiceEvent]], Awaitable[None]]


@dataclass(slots=True)
class Summary:
    """One provider's sweep, as ``payhook recover --once`` prints it."""

    provider: Provider
    missing: tuple[str, ...] = ()
    listed: int = 0
    fetched: int = 0
    published: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def configured(self) -> bool:
        return not self.missing

    @property
    def ok(self) -> bool:
        return self.configured and not self.errors

    @property
    def outcome(self) -> str:
        if not self.configured:
            return "not_configured"
        return "ok" if self.ok else "error"

    def line(self) -> str:
        if not self.configured:
            return f"{self.provider}: not configured (set {', '.join(self.missing)})"
        text = (
            f"{self.provider}: {self.outcome} listed={self.listed} fetched={self.fetched} "
            f"published={self.published} skipped={self.skipped} errors={len(self.errors)} "
            f"seconds={self.seconds:.1f}"
        )
        shown = "; ".join(self.errors[:_SHOWN_ERRORS])
        if len(self.errors) > _SHOWN_ERRORS:
            shown += f"; and {len(self.errors) - _SHOWN_ERRORS} more"
        return f"{text} ({shown})" if self.errors else text


def worth_publishing(event: InvoiceEvent) -> bool:
    """A listed Bitfinex invoice carries news a merchant must notice once it completed or
    expired (what its webhook would have said) or once money arrived; a created invoice that
    nobody paid yet is no missed notification."""
    return event.status in ("completed", "expired", "cancelled") or bool(event.payments)


def _key(event: InvoiceEvent) -> str:
    return f"{event.provider}:{event.invoice_id}"


@final
class Sweeper:
    """Runs sweeps; one per process. ``apis`` holds the configured providers' clients and
    ``missing`` the settings each unconfigured provider lacks."""

    def __init__(
        self,
        *,
        store: StoreView,
        publish: Publish,
        lookback: float,
        bitfinex: BitfinexApi | None = None,
        refresh: dict[Provider, StatusApi] | None = None,
        missing: dict[Provider, tuple[str, ...]] | None = None,
        wall: Callable[[], datetime] | None = None,
        on_summary: Callable[[Summary], None] | None = None,
        on_published: Callable[[InvoiceEvent], None] | None = None,
    ) -> None:
        self._store = store
        self._publish = publish
        self._lookback = timedelta(seconds=lookback)
        self._bitfinex = bitfinex
        self._refresh = refresh or {}
        self._missing = missing or {}
        self._wall = wall or (lambda: datetime.now(UTC))
        self._on_summary = on_summary or (lambda summary: None)
        self._on_published = on_published or (lambda event: None)

    async def sweep(self) -> list[Summary]:
        """Every provider, in a fixed order; each summary also goes to ``on_summary``."""
        summaries: list[Summary] = []
        for provider in ("bitfinex", "cryptosteroid", "cryptopos"):
            summary = Summary(provider=provider, missing=self._missing.get(provider, ()))
            if summary.configured:
                started = time.monotonic()
                await self._sweep_one(summary)
                summary.seconds = time.monotonic() - started
            for reason in summary.errors:
                log.warning("recover_error", provider=provider, reason=reason)
            log.info(
                "recover_sweep",
                provider=provider,
                outcome=summary.outcome,
                listed=summary.listed,
                fetched=summary.fetched,
                published=summary.published,
                skipped=summary.skipped,
                errors=len(summary.errors),
                seconds=round(summary.seconds, 3),
            )
            self._on_summary(summary)
            summaries.append(summary)
        return summaries

    async def _sweep_one(self, summary: Summary) -> None:
        now = self._wall()
        try:
            if summary.provider == "bitfinex":
                assert self._bitfinex is not None
                events = await self._discover(self._bitfinex, summary, now)
            else:
                events = await self._refreshed(self._refresh[summary.provider], summary, now)
            await self._publish_unseen(events, summary)
        except ApiError as exc:
            summary.errors.append(exc.reason)

    async def _discover(
        self, api: BitfinexApi, summary: Summary, now: datetime
    ) -> list[InvoiceEvent]:
        end_ms = int(now.timestamp() * 1000)
        start_ms = end_ms - int(self._lookback.total_seconds() * 1000)
        listing = await api.list_invoices(start_ms, end_ms, now)
        summary.listed = listing.listed
        summary.fetched = len(listing.events)
        summary.errors += listing.errors
        events = [e for e in listing.events.values() if worth_publishing(e)]
        summary.skipped += summary.fetched - len(events)
        return events

    async def _refreshed(
        self, api: StatusApi, summary: Summary, now: datetime
    ) -> list[InvoiceEvent]:
        invoice_ids = await self._store.refreshable(
            summary.provider, REFRESH_STATES, now - self._lookback
        )
        summary.listed = len(invoice_ids)
        gate = asyncio.Semaphore(REFRESH_CONCURRENCY)
        events: list[InvoiceEvent] = []

        async def refresh(invoice_id: str) -> None:
            async with gate:
                try:
                    events.append(await api.fetch(invoice_id, now))
                except CredentialsRejected:
                    raise
                except ApiError as exc:
                    summary.errors.append(f"invoice {invoice_id[:64]}: {exc.reason}")

        # A refused credential stops every read: the TaskGroup cancels the rest.
        try:
            async with asyncio.TaskGroup() as group:
                for invoice_id in invoice_ids:
                    group.create_task(refresh(invoice_id))
        except* CredentialsRejected as refused:
            first = refused.exceptions[0]
            assert isinstance(first, CredentialsRejected)
            raise first from None
        summary.fetched = len(events)
        return events

    async def _publish_unseen(self, events: list[InvoiceEvent], summary: Summary) -> None:
        if not events:
            return
        processed = await self._store.processed_event_ids({_key(e) for e in events})
        unseen = [e for e in events if e.event_id not in processed.get(_key(e), frozenset())]
        summary.skipped += len(events) - len(unseen)
        if not unseen:
            return
        try:
            await self._publish(unseen)
        except PublishFailed as exc:
            summary.errors.append(f"publishing {len(unseen)} events failed: {exc}")
            return
        summary.published = len(unseen)
        for event in unseen:
            log.warning(
                "recovered_event",
                provider=event.provider,
                invoice_id=event.invoice_id,
                event_id=event.event_id,
                status=event.status,
            )
            self._on_published(event)
