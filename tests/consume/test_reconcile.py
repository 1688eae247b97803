"""Reconciliation as pure functions: DESIGN.md rules 1-7, case by case and as properties."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import InvoiceEvent, InvoiceStatus, Payment, Provider, Settlement
from service.consume.reconcile import (
    InvalidEvent,
    InvoiceState,
    apply,
    apply_all,
    apply_batch,
    invoice_key,
    validate,
)

T0 = datetime(2021, 1, 6, 21, 16, 28, tzinfo=UTC)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def D(text: str) -> Decimal:
    return Decimal(text)


def pay(
    txid: str,
    amount: str | None,
    currency: str = "BTC",
    *,
    confirmations: int | None = 6,
    force_completed: bool = False,
    minutes: int = 0,
) -> Payment:
    return Payment(
        txid=txid,
        amount=None if amount is None else D(amount),
        currency=currency,
        method="BITCOIN",
        confirmations=confirmations,
        created_at=T0 + timedelta(minutes=minutes),
        updated_at=T0 + timedelta(minutes=minutes),
        force_completed=force_completed,
    )


def event(
    status: InvoiceStatus = "completed",
    *,
    provider: Provider = "bitfinex",
    invoice_id: str = "inv-1",
    minutes: int = 0,
    payments: tuple[Payment, ...] = (),
    expected: str | None = "0.00006262",
    pay_currency: str | None = "BTC",
    amount_diff: str | None = None,
    paid_total: str | None = None,
    order_id: str | None = "order123",
    tag: str = "",
) -> InvoiceEvent:
    fields: dict[str, Any] = {
        "provider": provider,
        "invoice_id": invoice_id,
        "order_id": order_id,
        "status": status,
        "provider_status": status.upper(),
        "amount": D("2.5"),
        "currency": "USD",
        "pay_currency": pay_currency,
        "expected_pay_amount": None if expected is None else D(expected),
        "payments": payments,
        "amount_diff": None if amount_diff is None else D(amount_diff),
        "paid_total": None if paid_total is None else D(paid_total),
        "occurred_at": T0 + timedelta(minutes=minutes),
        "received_at": T0 + timedelta(minutes=minutes, seconds=1),
    }
    content = msgspec.json.encode(fields) + tag.encode()
    return InvoiceEvent(event_id=hashlib.sha256(content).hexdigest()[:32], **fields)


def run(*events: InvoiceEvent) -> Settlement:
    state, _ = apply_all(None, events, NOW)
    assert state is not None
    return state.settlement


def content(settlement: Settlement) -> bytes:
    """The settlement without the fields that record the path taken."""
    fields = msgspec.structs.asdict(settlement)
    for name in ("version", "last_event_id", "updated_at"):
        del fields[name]
    return msgspec.json.encode(fields)


# --- Bitfinex -------------------------------------------------------------------------------


def test_seed_003_example_is_paid_exactly() -> None:
    s = run(event(payments=(pay("5119b4ca", "0.00006262"),)))
    assert s.state == "paid"
    assert s.expected_amount == D("0.00006262")
    assert str(s.paid_amount) == "0.00006262"
    assert s.difference == 0
    assert str(s.difference) == "0"
    assert s.pay_currency == "BTC"
    assert s.version == 1
    assert s.force_completed is False
    assert s.discrepancy is False
    assert s.provider_amount_diff is None
    assert [p.txid for p in s.payments] == ["5119b4ca"]
    encoded = msgspec.json.decode(msgspec.json.encode(s))
    assert encoded["paid_amount"] == "0.00006262"
    assert encoded["difference"] == "0"
    assert encoded["expected_amount"] == "0.00006262"


def test_underpaid_with_additional_payments_sums_distinct_payments() -> None:
    s = run(
        event(
            expected="1.0",
            payments=(pay("a", "0.4"), pay("b", "0.3", minutes=1)),
            amount_diff="-0.3",
        )
    )
    assert s.state == "underpaid"
    assert s.paid_amount == D("0.7")
    assert s.difference == D("-0.3")
    assert s.provider_amount_diff == D("-0.3")
    assert s.discrepancy is False


def test_payment_repeated_inside_additional_payments_counts_once() -> None:
    s = run(
        event(
            expected="1.0",
            payments=(pay("a", "0.5", confirmations=2), pay("a", "0.5", confirmations=6)),
        )
    )
    assert s.paid_amount == D("0.5")
    assert len(s.payments) == 1
    assert s.payments[0].confirmations == 6
    assert s.state == "underpaid"


def test_same_txid_in_another_currency_is_another_payment() -> None:
    s = run(event(expected="1", payments=(pay("a", "0.5", "BTC"), pay("a", "0.5", "LNX"))))
    assert s.paid_amount == D("1.0")
    assert s.state == "paid"
    assert len(s.payments) == 2


def test_force_completed_is_a_flag_beside_the_state() -> None:
    s = run(event(expected="1.0", payments=(pay("a", "0.9", force_completed=True),)))
    assert s.state == "underpaid"
    assert s.force_completed is True
    assert s.difference == D("-0.1")


def test_overpaid() -> None:
    s = run(event(expected="1.0", payments=(pay("a", "1.25"),)))
    assert (s.state, s.difference) == ("overpaid", D("0.25"))


@pytest.mark.parametrize(
    ("amount_diff", "discrepancy"),
    [("0.1", False), ("-0.1", False), ("0.10000", False), ("0.2", True), ("0", True)],
)
def test_discrepancy_compares_absolute_values(amount_diff: str, discrepancy: bool) -> None:
    s = run(event(expected="1.0", payments=(pay("a", "0.9"),), amount_diff=amount_diff))
    assert s.discrepancy is discrepancy
    assert s.provider_amount_diff == D(amount_diff)


def test_expired_after_completed_never_downgrades_and_publishes_nothing() -> None:
    done = event(payments=(pay("a", "0.00006262"),))
    expired = event("expired", minutes=30, expected=None, pay_currency=None)
    state, outcomes = apply_all(None, [done, expired], NOW)
    assert outcomes == ["changed", "unchanged"]
    assert state is not None
    assert state.settlement.state == "paid"
    assert state.settlement.version == 1
    assert state.settlement.last_event_id == done.event_id
    assert state.has_event(expired.event_id)


def test_completed_arriving_after_a_later_expiry_still_completes() -> None:
    expired = event("expired", minutes=30, expected=None, pay_currency=None)
    done = event(payments=(pay("a", "0.00006262"),))
    state, outcomes = apply_all(None, [expired, done], NOW)
    assert state is not None
    assert outcomes == ["changed", "changed"]
    assert state.settlement.state == "paid"
    assert state.settlement.version == 2


def test_bitfinex_expired_only_has_no_expected_amount() -> None:
    s = run(event("expired", expected=None, pay_currency=None))
    assert s.state == "expired"
    assert s.expected_amount is None
    assert s.difference is None
    assert s.paid_amount == 0
    assert s.discrepancy is False


def test_expected_amount_is_remembered_across_events() -> None:
    created = event("created", expected="0.5", pay_currency="BTC")
    expired = event("expired", minutes=60, expected=None, pay_currency=None)
    s = run(created, expired)
    assert s.state == "expired"
    assert s.expected_amount == D("0.5")
    assert s.pay_currency == "BTC"
    assert s.difference == D("-0.5")


def test_later_copy_of_a_payment_updates_confirmations_and_bumps_version() -> None:
    first = event("pending", payments=(pay("a", "0.00006262", confirmations=1),))
    later = event("pending", minutes=5, payments=(pay("a", "0.00006262", confirmations=3),))
    state, outcomes = apply_all(None, [later, first], NOW)
    assert state is not None
    # The earlier copy arriving last does not roll confirmations back.
    assert outcomes == ["changed", "unchanged"]
    assert state.settlement.payments[0].confirmations == 3
    assert state.settlement.paid_amount == D("0.00006262")
    state2, outcomes2 = apply_all(None, [first, later], NOW)
    assert state2 is not None
    assert outcomes2 == ["changed", "changed"]
    assert state2.settlement.version == 2
    assert content(state2.settlement) == content(state.settlement)


def test_states_before_completion() -> None:
    assert run(event("created", payments=())).state == "awaiting_payment"
    assert run(event("pending", payments=(pay("a", "0.1"),))).state == "partially_paid"
    assert run(event("cancelled", provider="cryptosteroid")).state == "cancelled"
    cancelled_paid = event("cancelled", provider="cryptosteroid", paid_total="0.1")
    assert run(cancelled_paid).state == "expired_underpaid"
    assert run(event("expired", payments=(pay("a", "0.1"),))).state == "expired_underpaid"


def test_completion_stays_final_but_a_later_payment_makes_it_overpaid() -> None:
    done = event(expected="1.0", payments=(pay("a", "1.0"),))
    late = event("pending", minutes=10, expected="1.0", payments=(pay("b", "0.5", minutes=10),))
    s = run(done, late)
    assert (s.state, s.paid_amount, s.difference, s.version) == (
        "overpaid",
        D("1.5"),
        D("0.5"),
        2,
    )


def test_exact_decimals_no_float_rounding() -> None:
    s = run(
        event(
            expected="0.3",
            payments=(pay("a", "0.1"), pay("b", "0.2")),
        )
    )
    assert (s.paid_amount, s.difference, s.state) == (D("0.3"), D("0.0"), "paid")
    big = "123456789012345678901234567890.123456789012345678"
    s = run(event(expected=big, payments=(pay("a", big), pay("b", "0.000000000000000001"))))
    assert str(s.paid_amount) == "123456789012345678901234567890.123456789012345679"
    assert s.difference == D("0.000000000000000001")
    assert s.state == "overpaid"


# --- running totals: CryptoSteroid and Crypto POS ------------------------------------------


def steroid(
    status: InvoiceStatus, minutes: int, received: str | None, *hashes: str
) -> InvoiceEvent:
    return event(
        status,
        provider="cryptosteroid",
        invoice_id="cs-1",
        minutes=minutes,
        expected="0.01",
        pay_currency="BTC",
        paid_total=received,
        payments=tuple(pay(h, None, confirmations=None) for h in hashes),
    )


def test_cryptosteroid_running_total_takes_latest_by_provider_time() -> None:
    early = steroid("pending", 1, "0.004", "h1")
    later = steroid("pending", 2, "0.006", "h1", "h2")
    for order in ([early, later], [later, early]):
        s = run(*order)
        assert s.paid_amount == D("0.006")
        assert s.state == "partially_paid"
        assert [p.txid for p in s.payments] == ["h1", "h2"]
        assert all(p.amount is None for p in s.payments)


def test_running_total_latest_wins_even_when_smaller_and_tie_keeps_larger() -> None:
    s = run(steroid("pending", 1, "0.006"), steroid("pending", 2, "0.004"))
    assert s.paid_amount == D("0.004")
    tie_a = steroid("pending", 3, "0.005")
    tie_b = steroid("pending", 3, "0.007")
    assert run(tie_a, tie_b).paid_amount == D("0.007")
    assert run(tie_b, tie_a).paid_amount == D("0.007")


def test_cryptosteroid_paid_and_expired() -> None:
    assert run(steroid("completed", 5, "0.01", "h1")).state == "paid"
    assert run(steroid("expired", 5, None)).state == "expired"
    assert run(steroid("expired", 5, "0.002", "h1")).state == "expired_underpaid"
    assert run(steroid("pending", 1, None)).paid_amount == 0


def pos(completed: bool, minutes: int, paid: str, *txs: tuple[str, str]) -> InvoiceEvent:
    return event(
        "completed" if completed else "pending",
        provider="cryptopos",
        invoice_id="pos-1",
        minutes=minutes,
        expected="10.00",
        pay_currency="USD",
        paid_total=paid,
        payments=tuple(pay(tx, usd, "USDT", confirmations=None) for tx, usd in txs),
    )


def test_cryptopos_partial_then_completed_then_overpaid() -> None:
    partial = pos(False, 1, "4.00", ("t1", "4.00"))
    full = pos(True, 2, "10.00", ("t1", "4.00"), ("t2", "6.00"))
    extra = pos(True, 3, "11.50", ("t1", "4.00"), ("t2", "6.00"), ("t3", "1.50"))
    state, outcomes = apply_all(None, [partial], NOW)
    assert state is not None
    assert state.settlement.state == "partially_paid"
    state, outcomes = apply_all(state, [full, extra], NOW)
    assert state is not None
    s = state.settlement
    assert outcomes == ["changed", "changed"]
    assert (s.state, s.paid_amount, s.difference, s.version) == (
        "overpaid",
        D("11.50"),
        D("1.50"),
        3,
    )
    assert s.pay_currency == "USD"
    assert len(s.payments) == 3


# --- idempotency and versions ---------------------------------------------------------------


def test_duplicate_changes_nothing() -> None:
    e = event(payments=(pay("a", "0.00006262"),))
    first = apply(None, e, NOW)
    again = apply(first.state, e, NOW + timedelta(hours=1))
    assert again.outcome == "duplicate"
    assert again.state is first.state


def test_versions_count_changing_events_only() -> None:
    created = event("created", payments=())
    pending = event("pending", minutes=1, payments=(pay("a", "0.00003"),))
    done = event(minutes=2, payments=(pay("a", "0.00003"), pay("b", "0.00003262")))
    expired = event("expired", minutes=3, expected=None, pay_currency=None)
    state, outcomes = apply_all(None, [created, pending, created, done, expired, done], NOW)
    assert outcomes == ["changed", "changed", "duplicate", "changed", "unchanged", "duplicate"]
    assert state is not None
    assert state.settlement.version == 3
    assert state.settlement.last_event_id == done.event_id
    assert state.settlement.state == "paid"


def test_batch_publishes_only_the_latest_version_per_invoice() -> None:
    created = event("created", payments=())
    pending = event("pending", minutes=1, payments=(pay("a", "0.00003"),))
    other = event(invoice_id="inv-2", payments=(pay("z", "0.00006262"),))
    result = apply_batch({}, [created, other, pending, created], NOW)
    assert result.outcomes == ["changed", "changed", "changed", "duplicate"]
    assert set(result.settlements) == {"bitfinex:inv-1", "bitfinex:inv-2"}
    assert result.settlements["bitfinex:inv-1"].version == 2
    assert result.settlements["bitfinex:inv-1"].state == "partially_paid"
    assert result.states["bitfinex:inv-1"].settlement == result.settlements["bitfinex:inv-1"]
    assert result.rejected == {}
    # A batch of known invoices: unchanged ones are stored (their facts grew), not published.
    expired = event("expired", invoice_id="inv-2", minutes=5, expected=None, pay_currency=None)
    again = apply_batch(result.states, [expired, other], NOW)
    assert again.outcomes == ["unchanged", "duplicate"]
    assert again.settlements == {}
    assert set(again.states) == {"bitfinex:inv-2"}


def test_an_event_beyond_exact_arithmetic_is_rejected_and_the_batch_goes_on() -> None:
    huge = event(expected="1E+300", payments=(pay("a", "1E-300"),))
    fine = event(invoice_id="inv-2", payments=(pay("b", "0.00006262"),))
    result = apply_batch({}, [huge, fine], NOW)
    assert result.outcomes == ["invalid", "changed"]
    assert result.rejected == {0: "cannot reconcile: Inexact"}
    assert set(result.states) == {"bitfinex:inv-2"}


def test_state_round_trips_through_json() -> None:
    state, _ = apply_all(None, [event(payments=(pay("a", "0.00006262"),))], NOW)
    blob = msgspec.json.encode(state)
    assert msgspec.json.decode(blob, type=InvoiceState) == state


# --- validation (what goes to the DLQ) ------------------------------------------------------


def test_validate_accepts_a_good_event_and_its_key() -> None:
    e = event(payments=(pay("a", "1"),))
    validate(e, invoice_key("bitfinex", "inv-1").encode())
    validate(e, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"occurred_at": datetime(2021, 1, 1)}, "occurred_at has no time zone"),
        ({"received_at": datetime(2021, 1, 1)}, "received_at has no time zone"),
        ({"amount_diff": Decimal("NaN")}, "amount_diff is not a finite amount"),
        ({"paid_total": Decimal("Infinity")}, "paid_total is not a finite amount"),
        ({"expected_pay_amount": Decimal("-Infinity")}, "expected_pay_amount"),
        ({"expected_pay_amount": Decimal("1E+999990")}, "expected_pay_amount is beyond the"),
        ({"amount": Decimal("1" * 61)}, "amount is beyond the bounds of an amount"),
        ({"payments": (pay("a", "1E-400"),)}, "payments[0].amount is beyond the bounds"),
        ({"payments": (pay("a", None),)}, "payments[0].amount is required"),
        ({"payments": (pay("", "1"),)}, "payments[0].txid must not be empty"),
        ({"event_id": ""}, "must not be empty"),
        (
            {
                "payments": (
                    Payment(
                        txid="a", amount=D("1"), currency="BTC", created_at=datetime(2021, 1, 1)
                    ),
                )
            },
            "payments[0].created_at has no time zone",
        ),
    ],
)
def test_validate_rejects(change: dict[str, Any], message: str) -> None:
    bad = msgspec.structs.replace(event(payments=(pay("a", "1"),)), **change)
    with pytest.raises(InvalidEvent, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(bad)


def test_validate_rejects_a_key_for_another_invoice() -> None:
    with pytest.raises(InvalidEvent, match="record key"):
        validate(event(), b"bitfinex:other")


# --- properties -----------------------------------------------------------------------------

# A small pool so that payments repeat across events; a txid always has the same amount.
POOL = {
    ("BTC", "t1"): "0.1",
    ("BTC", "t2"): "0.25",
    ("BTC", "t3"): "0.00000001",
    ("LNX", "t1"): "0.3",
    ("ETH", "t4"): "1.000000000000000001",
}
STATUSES: tuple[InvoiceStatus, ...] = ("created", "pending", "completed", "expired", "cancelled")


@st.composite
def invoice_events(draw: st.DrawFn, provider: Provider) -> list[InvoiceEvent]:
    count = draw(st.integers(min_value=1, max_value=6))
    events = []
    for i in range(count):
        keys = draw(st.lists(st.sampled_from(sorted(POOL)), max_size=4))
        payments = tuple(
            pay(
                txid,
                POOL[(cur, txid)],
                cur,
                confirmations=draw(st.integers(min_value=0, max_value=3)),
                force_completed=draw(st.booleans()),
            )
            for cur, txid in keys
        )
        events.append(
            event(
                draw(st.sampled_from(STATUSES)),
                provider=provider,
                minutes=draw(st.integers(min_value=0, max_value=3)),  # ties happen
                payments=payments,
                expected=draw(st.sampled_from([None, "0.35", "1"])),
                pay_currency=draw(st.sampled_from([None, "BTC"])),
                amount_diff=draw(st.sampled_from([None, "0.05", "-0.1"])),
                paid_total=draw(st.sampled_from([None, "0.1", "0.2"]))
                if provider != "bitfinex"
                else None,
                order_id=draw(st.sampled_from([None, "o1"])),
                tag=str(i),  # distinct events even with equal content
            )
        )
    return events


providers: st.SearchStrategy[Provider] = st.sampled_from(("bitfinex", "cryptosteroid", "cryptopos"))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_permutation_with_duplicates_ends_in_the_same_settlement(data: st.DataObject) -> None:
    events = data.draw(invoice_events(data.draw(providers)))
    reference = run(*events)
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=4))
    shuffled = data.draw(st.permutations(events + duplicates))
    other = run(*shuffled)
    assert content(other) == content(reference)
    assert 1 <= other.version <= len(events)


@settings(max_examples=300, deadline=None)
@given(events=invoice_events("bitfinex"))
def test_paid_amount_is_the_sum_of_distinct_payments(events: list[InvoiceEvent]) -> None:
    s = run(*events)
    distinct = {(p.currency, p.txid) for e in events for p in e.payments}
    assert s.paid_amount == sum((D(POOL[k]) for k in distinct), Decimal(0))
    assert {(p.currency, p.txid) for p in s.payments} == distinct
    if s.expected_amount is not None:
        assert s.difference == s.paid_amount - s.expected_amount


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_duplicate_never_bumps_version(data: st.DataObject) -> None:
    events = data.draw(invoice_events(data.draw(providers)))
    state, outcomes = apply_all(None, events, NOW)
    assert state is not None
    assert state.settlement.version == outcomes.count("changed")
    again = data.draw(st.sampled_from(events))
    applied = apply(state, again, NOW + timedelta(days=1))
    assert applied.outcome == "duplicate"
    assert applied.state == state


# --- rule 8: an invoice belongs to the order it was first seen with -------------------------


def test_an_event_about_another_orders_invoice_changes_nothing() -> None:
    first = apply(None, event(payments=(pay("tx", "0.00006262"),)), NOW).state
    forged = event(order_id="orderB", payments=(pay("forged", "1"),), expected="1", tag="f")
    applied = apply(first, forged, NOW)
    assert applied.outcome == "conflict"
    assert applied.state is first
    assert first.settlement.order_id == "order123"


def test_order_conflicts_go_to_the_dlq_and_the_batch_goes_on() -> None:
    forged = event(order_id="orderB", payments=(pay("forged", "1"),), tag="f")
    real = event(payments=(pay("tx", "0.00006262"),))
    later = event(payments=(pay("tx", "0.00006262"), pay("tx2", "0.00000001")), minutes=5)
    result = apply_batch({}, [real, forged, later], NOW)
    assert result.outcomes == ["changed", "conflict", "changed"]
    assert result.rejected == {1: "order_conflict"}
    (settlement,) = result.settlements.values()
    assert (settlement.order_id, settlement.state, settlement.version) == (
        "order123",
        "overpaid",
        2,
    )
    assert "forged" not in [p.txid for p in settlement.payments]
    # Across batches too: the stored state remembers the order.
    again = apply_batch(result.states, [forged], NOW)
    assert (again.outcomes, again.rejected, again.states) == (
        ["conflict"],
        {0: "order_conflict"},
        {},
    )


def test_an_order_id_missing_on_either_side_is_no_conflict() -> None:
    # Crypto POS without a client names no order: the invoice is bound by the first that does.
    unnamed = apply(None, event(order_id=None, tag="n"), NOW).state
    named = apply(unnamed, event(order_id="orderA", minutes=1, tag="a"), NOW)
    assert named.outcome == "changed"
    assert named.state.order_id() == "orderA"
    assert apply(named.state, event(order_id=None, minutes=2, tag="n2"), NOW).outcome != "conflict"
    assert (
        apply(named.state, event(order_id="orderB", minutes=3, tag="b"), NOW).outcome == "conflict"
    )
