"""How the consumer paces its batches by the rate of records: pure, no broker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.consume.pipeline import BATCH_INTERVAL, BUSY_RATE, _Rate, batch_interval

rates = st.floats(min_value=0, max_value=1e7, allow_nan=False)


def test_a_trickle_is_not_made_to_wait_and_a_busy_stream_waits_the_whole_interval() -> None:
    assert batch_interval(0) == 0
    assert batch_interval(BUSY_RATE / 5) == BATCH_INTERVAL / 5
    assert batch_interval(BUSY_RATE) == BATCH_INTERVAL
    assert batch_interval(BUSY_RATE * 50) == BATCH_INTERVAL


@given(rates, rates)
def test_the_interval_grows_with_the_rate_within_its_bounds(a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert 0 <= batch_interval(low) <= batch_interval(high) <= BATCH_INTERVAL


def test_the_rate_counts_the_records_of_the_last_half_second() -> None:
    rate = _Rate()
    assert rate.add(10.0, 5) == 10  # 5 records in half a second
    assert rate.add(10.2, 5) == 20
    assert rate.add(10.5, 10) == 40  # the read at 10.0 is exactly half a second old
    # 10.0 and 10.2 fall out of the window; 10.5 and 10.71 remain.
    assert rate.add(10.71, 1) == 22


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 1000)), min_size=1, max_size=50))
def test_the_rate_is_what_the_window_holds(reads: list[tuple[float, int]]) -> None:
    rate = _Rate()
    now = 0.0
    seen: list[tuple[float, int]] = []
    for step, records in reads:
        now += step
        seen.append((now, records))
        held = sum(n for at, n in seen if at >= now - 0.5)
        assert rate.add(now, records) == held / 0.5
