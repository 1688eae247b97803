"""Reconciliation: invoice events in, settlements out. Pure functions, no I/O.

An invoice's state is the set of facts of every distinct event applied to it, plus the last
settlement. The settlement is recomputed from all the facts each time, and every choice among
facts is made by a total order (provider time first, then a content-derived tiebreak), never by
arrival order. So any permutation of an invoice's events, duplicates included, ends in the same
settlement; only ``version``, ``last_event_id`` and ``updated_at`` record the path taken.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal, final

import msgspec

from schemas.events import (
    InvoiceEvent,
    Payment,
    Provider,
    Settlement,
    SettlementState,
)

# RUNNING_TOTAL_PROVIDERS: providers whose paid amount is their own running total, not a sum
# of payments (each provider says so in its module).
from service.providers import RUNNING_TOTAL_PROVIDERS
from service.providers.normalize import MAX_DIGITS, MAX_EXPONENT, within_bounds

# Re-exported for what names the stored state through reconciliation (the pipeline, faults/).
from service.state import Fact as Fact
from service.state import InvoiceState as InvoiceState
from service.state import invoice_key as invoice_key

# Ranks break provider-time ties between statuses: the further along wins.
_STATUS_RANK: Final[dict[str, int]] = {
    "created": 0,
    "pending": 1,
    "expired": 2,
    "cancelled": 3,
    "completed": 4,
}

# Sums and differences must be exact: wide enough for any amount a provider sends.
_EXACT: Final = decimal.Context(prec=200, traps=[decimal.Inexact, decimal.InvalidOperation])

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_payment_encoder: Final = msgspec.json.Encoder()

Outcome = Literal["duplicate", "unchanged", "changed", "conflict"]

# The DLQ ``error`` of an event about an invoice that belongs to another order.
ORDER_CONFLICT: Final = "order_conflict"


class InvalidEvent(ValueError):
    """A decodable event that cannot be reconciled; the message says why (for the DLQ)."""


@final
class Applied(msgspec.Struct, frozen=True):
    """The result of applying one event: the new state, and what happened."""

    state: InvoiceState
    outcome: Outcome


def _aware(value: datetime | None, what: str) -> None:
    if value is not None and value.utcoffset() is None:
        raise InvalidEvent(f"{what} has no time zone")


def _amount(value: Decimal | None, what: str) -> None:
    """An amount another producer wrote may be what ingest refuses (DESIGN.md, Events)."""
    if value is None:
        return
    if not value.is_finite():
        raise InvalidEvent(f"{what} is not a finite amount")
    if not within_bounds(value):
        raise InvalidEvent(
            f"{what} is beyond the bounds of an amount (at most {MAX_DIGITS} significant "
            f"digits, exponent within +-{MAX_EXPONENT})"
        )


def validate(event: InvoiceEvent, key: bytes | None = None) -> None:
    """Raises :class:`InvalidEvent` for an event that decodes but must go to the DLQ."""
    if key is not None and key != invoice_key(event.provider, event.invoice_id).encode():
        raise InvalidEvent("record key does not match provider:invoice_id")
    if not event.event_id or not event.invoice_id:
        raise InvalidEvent("event_id and invoice_id must not be empty")
    _aware(event.occurred_at, "occurred_at")
    _aware(event.received_at, "received_at")
    _amount(event.amount, "amount")
    _amount(event.expected_pay_amount, "expected_pay_amount")
    _amount(event.amount_diff, "amount_diff")
    _amount(event.paid_total, "paid_total")
    for i, payment in enumerate(event.payments):
        where = f"payments[{i}]"
        if not payment.txid:
            raise InvalidEvent(f"{where}.txid must not be empty")
        _amount(payment.amount, f"{where}.amount")
        _amount(payment.crypto_amount, f"{where}.crypto_amount")
        _aware(payment.created_at, f"{where}.created_at")
        _aware(payment.updated_at, f"{where}.updated_at")
        if payment.amount is None and event.provider not in RUNNING_TOTAL_PROVIDERS:
            raise InvalidEvent(f"{where}.amount is required for {event.provider}")


def fact_of(event: InvoiceEvent) -> Fact:
    return Fact(
        event_id=event.event_id,
        status=event.status,
        occurred_at=event.occurred_at,
        order_id=event.order_id,
        pay_currency=event.pay_currency,
        expected_amount=event.expected_pay_amount,
        amount_diff=event.amount_diff,
        paid_total=event.paid_total,
        payments=event.payments,
    )


def _plain(value: Decimal) -> Decimal:
    """The same number without a positive exponent (``1E+2`` -> ``100``), and zero as ``0``
    (``0.1 - 0.1`` would otherwise encode as ``0E-1``)."""
    if value.is_zero():
        return Decimal(0)
    return Decimal(format(value, "f"))


def _order(fact: Fact) -> tuple[datetime, int, str]:
    """Provider time; ties go to the further status, then the (content-derived) event id."""
    return (fact.occurred_at, _STATUS_RANK[fact.status], fact.event_id)


def _copy_rank(occurred_at: datetime, payment: Payment) -> tuple[datetime, int, datetime]:
    confirmations = -1 if payment.confirmations is None else payment.confirmations
    return (occurred_at, confirmations, payment.updated_at or _EPOCH)


def _distinct_payments(facts: Iterable[Fact]) -> tuple[Payment, ...]:
    """One copy per (currency, txid): the one from the latest event by provider time, then the
    one with the most confirmations (a payment repeated inside ``additionalPayments``); equal
    ranks are settled by the copies' encoded bytes, so the choice never depends on order."""
    best: dict[tuple[str, str], tuple[tuple[datetime, int, datetime], Payment]] = {}
    for fact in facts:
        for payment in fact.payments:
            ident = (payment.currency, payment.txid)
            held = best.get(ident)
            if held is None:
                best[ident] = (_copy_rank(fact.occurred_at, payment), payment)
                continue
            rank = _copy_rank(fact.occurred_at, payment)
            if rank > held[0] or (
                rank == held[0]
                and payment != held[1]
                and _payment_encoder.encode(payment) > _payment_encoder.encode(held[1])
            ):
                best[ident] = (rank, payment)
    if len(best) == 1:
        return (next(iter(best.values()))[1],)
    return tuple(
        payment
        for _, payment in sorted(
            best.values(),
            key=lambda item: (
                item[1].created_at or _EPOCH,
                item[1].currency,
                item[1].txid,
            ),
        )
    )


def settle(
    provider: Provider,
    invoice_id: str,
    facts: tuple[Fact, ...],
    *,
    version: int,
    last_event_id: str,
    updated_at: datetime,
) -> Settlement:
    """The settlement that ``facts`` add up to (order of ``facts`` does not matter)."""
    payments = _distinct_payments(facts)

    if provider in RUNNING_TOTAL_PROVIDERS:
        totals = [(f.occurred_at, f.paid_total) for f in facts if f.paid_total is not None]
        paid = max(totals)[1] if totals else Decimal(0)
    else:
        paid = Decimal(0)
        for payment in payments:
            if payment.amount is not None:
                paid = _EXACT.add(paid, payment.amount)
    paid = _plain(paid)

    # Latest first; each field comes from the latest fact that states it.
    ordered = facts if len(facts) == 1 else sorted(facts, key=_order, reverse=True)
    with_expected = next((f for f in ordered if f.expected_amount is not None), None)
    if with_expected is not None:
        expected = with_expected.expected_amount
        pay_currency = with_expected.pay_currency
    else:
        expected = None
        pay_currency = next((f.pay_currency for f in ordered if f.pay_currency is not None), None)
    difference = None if expected is None else _plain(_EXACT.subtract(paid, expected))

    amount_diff = next((f.amount_diff for f in ordered if f.amount_diff is not None), None)
    discrepancy = (
        amount_diff is not None
        and difference is not None
        and _EXACT.abs(difference) != _EXACT.abs(amount_diff)
    )
    order_id = next((f.order_id for f in ordered if f.order_id is not None), None)

    some_payment = bool(payments) or paid > 0
    state: SettlementState
    if any(f.status == "completed" for f in facts):
        # Completion is final whatever the times say; amounts keep moving.
        if difference is None or difference == 0:
            state = "paid"
        elif difference > 0:
            state = "overpaid"
        else:
            state = "underpaid"
    else:
        status = ordered[0].status
        if status == "expired":
            state = "expired_underpaid" if some_payment else "expired"
        elif status == "cancelled":
            state = "expired_underpaid" if some_payment else "cancelled"
        else:
            state = "partially_paid" if some_payment else "awaiting_payment"

    return Settlement(
        provider=provider,
        invoice_id=invoice_id,
        order_id=order_id,
        state=state,
        force_completed=any(p.force_completed for f in facts for p in f.payments),
        pay_currency=pay_currency,
        expected_amount=expected,
        paid_amount=paid,
        difference=difference,
        provider_amount_diff=amount_diff,
        discrepancy=discrepancy,
        payments=payments,
        version=version,
        last_event_id=last_event_id,
        updated_at=updated_at,
    )


def apply(state: InvoiceState | None, event: InvoiceEvent, now: datetime) -> Applied:
    """Applies one validated event to an invoice's state.

    A duplicate (same ``event_id``) returns the state untouched. So does an event whose order
    id differs from the one the invoice was first seen with (both named): ``conflict``, since
    a per-order secret must never move another order's money. An event that changes no
    settlement field keeps ``version``, ``last_event_id`` and ``updated_at``; one that changes
    any other field bumps ``version`` by one.
    """
    if state is not None:
        if state.has_event(event.event_id):
            return Applied(state, "duplicate")
        if event.order_id is not None:
            owner = state.order_id()
            if owner is not None and owner != event.order_id:
                return Applied(state, "conflict")
    fact = fact_of(event)
    facts = (*state.facts, fact) if state is not None else (fact,)
    settlement = settle(
        event.provider,
        event.invoice_id,
        facts,
        version=1 if state is None else state.settlement.version + 1,
        last_event_id=event.event_id,
        updated_at=now,
    )
    if state is None:
        return Applied(InvoiceState(facts=facts, settlement=settlement), "changed")
    previous = state.settlement
    # Rebuilt even when unchanged in value, so the stored digits are those every order gives.
    kept = msgspec.structs.replace(
        settlement,
        version=previous.version,
        last_event_id=previous.last_event_id,
        updated_at=previous.updated_at,
    )
    if kept != previous:
        return Applied(InvoiceState(facts=facts, settlement=settlement), "changed")
    return Applied(InvoiceState(facts=facts, settlement=kept), "unchanged")


def apply_all(
    state: InvoiceState | None, events: Iterable[InvoiceEvent], now: datetime
) -> tuple[InvoiceState | None, list[Outcome]]:
    """Applies events in order; returns the final state and each event's outcome."""
    outcomes: list[Outcome] = []
    for event in events:
        applied = apply(state, event, now)
        state = applied.state
        outcomes.append(applied.outcome)
    return state, outcomes


BatchOutcome = Literal["duplicate", "unchanged", "changed", "conflict", "invalid"]


@final
class BatchResult(msgspec.Struct):
    """What a batch of events did: changed states, settlements to publish, outcomes (one per
    event, in order), why each ``invalid`` or ``conflict`` one goes to the DLQ, and every new
    settlement version in order (the store keeps them all)."""

    states: dict[str, InvoiceState]
    settlements: dict[str, Settlement]
    outcomes: list[BatchOutcome]
    rejected: dict[int, str]
    versions: list[Settlement] = msgspec.field(default_factory=list)


def apply_batch(
    states: Mapping[str, InvoiceState], events: Iterable[InvoiceEvent], now: datetime
) -> BatchResult:
    """Applies validated events in order to the invoices' current ``states`` (absent: never
    seen). Only the latest new settlement version of each invoice is to be published. An event
    that cannot be reconciled (an amount beyond exact arithmetic) is ``invalid``, one about
    another order's invoice a ``conflict`` (:data:`ORDER_CONFLICT`): either changes nothing
    and the rest of the batch goes on."""
    current: dict[str, InvoiceState] = dict(states)
    changed: dict[str, InvoiceState] = {}
    settlements: dict[str, Settlement] = {}
    outcomes: list[BatchOutcome] = []
    rejected: dict[int, str] = {}
    versions: list[Settlement] = []
    for index, event in enumerate(events):
        key = invoice_key(event.provider, event.invoice_id)
        try:
            applied = apply(current.get(key), event, now)
        except (ArithmeticError, ValueError, TypeError) as exc:
            outcomes.append("invalid")
            rejected[index] = f"cannot reconcile: {type(exc).__name__}"
            continue
        outcomes.append(applied.outcome)
        if applied.outcome == "conflict":
            rejected[index] = ORDER_CONFLICT
            continue
        if applied.outcome == "duplicate":
            continue
        current[key] = changed[key] = applied.state
        if applied.outcome == "changed":
            settlements[key] = applied.state.settlement
            versions.append(applied.state.settlement)
    return BatchResult(
        states=changed,
        settlements=settlements,
        outcomes=outcomes,
        rejected=rejected,
        versions=versions,
    )
