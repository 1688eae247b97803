"""The event-loop histogram exposes what prometheus_client's Histogram and Counter would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from service.metrics import LATENCY_BUCKETS, LoopHistogram

LABELS = st.sampled_from([("bitfinex", "accepted"), ("bitfinex", "unauthorized"), ("pos", "x")])
# Bucket bounds themselves included: a value on a bound belongs to that bucket ("le").
VALUES = st.one_of(
    st.sampled_from(LATENCY_BUCKETS),
    st.floats(min_value=0, max_value=20, allow_nan=False),
)


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


@given(observations=st.lists(st.tuples(LABELS, VALUES), max_size=40))
def test_same_exposition_as_prometheus_client(
    observations: list[tuple[tuple[str, str], float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram(
        "t_seconds", "help", ["provider", "outcome"], LATENCY_BUCKETS, ours, counter=("t", "n")
    )
    histogram = Histogram(
        "t_seconds", "help", ["provider", "outcome"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    counter = Counter("t", "n", ["provider", "outcome"], registry=theirs)
    for labels, value in observations:
        loop.labels(*labels).observe(value)
        histogram.labels(*labels).observe(value)
        counter.labels(*labels).inc()
    assert exposition(ours) == exposition(theirs)


def test_wrong_label_count_is_refused() -> None:
    loop = LoopHistogram("t_seconds", "help", ["outcome"], LATENCY_BUCKETS, CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        loop.labels("a", "b")


def test_a_name_registered_twice_is_refused() -> None:
    registry = CollectorRegistry()
    LoopHistogram("t_seconds", "help", [], LATENCY_BUCKETS, registry, counter=("t", "n"))
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("t", "n", registry=registry)
