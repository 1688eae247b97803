"""The keep-alive benchmark's arithmetic: rounds from slices, and the round-to-round check."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.ingest import Load, Round, combined, excess_slowdowns


def load(per_second: float, seconds: float = 2.0, **fields: float) -> Load:
    return Load(
        requests=round(per_second * seconds),
        seconds=seconds,
        p50_ms=fields.get("p50_ms", 8.0),
        p99_ms=fields.get("p99_ms", 12.0),
        non_200=0,
        socket_errors=0,
        cpu_us=fields.get("cpu_us", 130.0),
        broker_cpu_us=fields.get("broker_cpu_us", 8.0),
    )


def test_a_round_adds_its_slices_up_and_keeps_the_worst_p99() -> None:
    slices = [
        load(7000, p50_ms=8, p99_ms=11, cpu_us=100),
        load(8000, p50_ms=9, p99_ms=19, cpu_us=200),
        load(9000, p50_ms=7, p99_ms=12, cpu_us=100),
    ]
    whole = combined(slices)
    assert whole.requests == 48000
    assert whole.per_second == pytest.approx(8000)
    assert (whole.p50_ms, whole.p99_ms) == (8, 19)
    # CPU time per request of the whole round: the busier slice weighs more.
    assert whole.cpu_us == pytest.approx((7 * 100 + 8 * 200 + 9 * 100) / 24)


def test_a_request_that_failed_is_not_counted_as_accepted() -> None:
    failed = Load(10000, 2.0, 8, 12, non_200=3000, socket_errors=1000)
    assert failed.per_second == 3000


steady = st.floats(min_value=1000, max_value=20000)
wobble = st.lists(st.floats(min_value=0.97, max_value=1.03), min_size=5, max_size=5)


@given(floor=steady, share=st.floats(0.3, 1.0), machine=wobble)
def test_what_slows_the_machine_slows_both_sides_and_is_not_payhooks(
    floor: float, share: float, machine: list[float]
) -> None:
    """A slice the machine slows, it slows for payhook and the floor alike: the ratio holds."""
    rounds = [
        Round([load(floor * share * m) for m in machine], [load(floor * m) for m in machine]),
        Round(
            [load(floor * share * m * 0.8) for m in machine],
            [load(floor * m * 0.8) for m in machine],
        ),
    ]
    assert rounds[1].ratio == pytest.approx(share, rel=1e-3)
    (excess,) = excess_slowdowns(rounds)
    # Within what the slices resolve (beyond it only by the rounding of request counts).
    assert excess.slowdown <= excess.resolution + 1e-3


@given(
    floor=steady,
    creep=st.floats(0.05, 0.5),
    noise=st.lists(st.floats(min_value=0.98, max_value=1.02), min_size=5, max_size=5),
)
def test_a_payhook_that_gets_slower_than_the_floor_is_caught(
    floor: float, creep: float, noise: list[float]
) -> None:
    """Slices that scatter by up to 2% resolve a drop of 5% or more of payhook alone."""
    first = Round([load(floor * 0.55 * n) for n in noise], [load(floor) for _ in noise])
    second = Round(
        [load(floor * 0.55 * (1 - creep) * n) for n in noise], [load(floor) for _ in noise]
    )
    (excess,) = excess_slowdowns([first, second])
    assert excess.slowdown == pytest.approx(creep, abs=0.001)
    assert excess.resolution < 0.05
    assert not excess.met


def test_a_round_of_one_slice_resolves_nothing() -> None:
    single = Round([load(7000)], [load(14000)])
    assert single.ratio == pytest.approx(0.5)
    assert math.isinf(single.ratio_error)


def test_payhook_getting_faster_is_no_slowdown() -> None:
    rounds = [
        Round([load(7000), load(7100)], [load(14000), load(14000)]),
        Round([load(7700), load(7800)], [load(14000), load(14000)]),
    ]
    (excess,) = excess_slowdowns(rounds)
    assert excess.slowdown < 0
    assert excess.met


def test_a_slice_the_floor_did_not_answer_leaves_the_round_unresolved_not_crashed() -> None:
    unanswered = Load(5000, 2.0, 8, 12, non_200=0, socket_errors=5000)
    broken = Round([load(7000), load(7000)], [load(14000), unanswered])
    assert math.isinf(broken.ratio_error)
    assert Round([load(7000)], [unanswered]).ratio == 0
    # wrk counts socket errors apart from completed requests: no negative throughput.
    assert Load(0, 2.0, 0, 0, non_200=0, socket_errors=64).per_second == 0
    fine = Round([load(7000), load(7100)], [load(14000), load(14100)])
    for a, b in ((fine, broken), (broken, fine)):
        (excess,) = excess_slowdowns([a, b])
        assert not excess.met  # what the run cannot resolve is not a pass


def test_a_payhook_all_refused_leaves_the_run_unresolved_not_crashed() -> None:
    refused = Round([Load(7000, 2.0, 8, 12, non_200=7000, socket_errors=0)] * 2, [load(14000)] * 2)
    fine = Round([load(7000), load(7100)], [load(14000), load(14100)])
    assert refused.ratio == 0
    assert not any(e.met for e in excess_slowdowns([refused, fine]))


def test_a_creep_too_small_between_neighbours_is_caught_from_first_to_last() -> None:
    scatter = [0.99, 1.01, 1.0, 0.99, 1.01]

    def round_at(share: float) -> Round:
        return Round([load(14000 * share * n) for n in scatter], [load(14000)] * 5)

    rounds = [round_at(0.55 * (1 - 0.012) ** k) for k in range(3)]
    first_second, second_third, first_last = excess_slowdowns(rounds)
    assert (first_last.first, first_last.second) == (1, 3)
    assert first_second.met
    assert second_third.met
    assert first_last.slowdown == pytest.approx(1 - 0.988**2, abs=1e-3)
    assert not first_last.met
