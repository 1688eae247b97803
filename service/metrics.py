"""Prometheus metrics, all ``payhook_*``: what both processes use (buckets, the loop-local
histogram, the build info). Each process's metrics live in its package
(:mod:`service.ingest.metrics`, :mod:`service.consume.metrics`).

Each process builds its own registry (no module globals), so tests can run several apps side by
side. Labels are bounded: provider, outcome, state, topic, partition; never an order or
invoice id.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final, final

from prometheus_client import CollectorRegistry, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service import __version__

# Sub-millisecond to 10 s.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# End-to-end (received -> settled) spans the spool and consumer lag: up to minutes.
E2E_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


@final
class Observations:
    """One label set of a :class:`LoopHistogram`: bucket counts and a sum, plain numbers."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf's
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value: Prometheus buckets are "less or equal".
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value


@final
class LoopHistogram(Collector):
    """A labelled histogram for code on one event loop, observed and collected on its thread.

    On every webhook request: prometheus_client's Histogram takes a lock for the sum and one for
    the bucket, its Counter another, and the three cost about 5 us a request in the serving
    process; this costs a list increment. ``counter`` also exposes the count of observations,
    by the same labels, as a Counter of that name (``payhook_webhooks_total``): one observation
    feeds both. Exposed like prometheus_client's, without ``_created`` samples.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
        counter: tuple[str, str] | None = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(buckets)
        # As prometheus_client writes them (repr of a float; +Inf last).
        self._les = [repr(float(b)) for b in self._bounds] + ["+Inf"]
        self._counter = counter
        self._series: dict[tuple[str, ...], Observations] = {}
        registry.register(self)

    def labels(self, *values: str) -> Observations:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = Observations(self._bounds)
        return series

    def _families(self) -> tuple[HistogramMetricFamily, CounterMetricFamily | None]:
        histogram = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        counter = None
        if self._counter is not None:
            name, documentation = self._counter
            counter = CounterMetricFamily(name, documentation, labels=self._labelnames)
        return histogram, counter

    def describe(self) -> Iterator[Metric]:
        for family in self._families():
            if family is not None:
                yield family

    def collect(self) -> Iterator[Metric]:
        histogram, counter = self._families()
        for values, series in list(self._series.items()):
            cumulative = list(itertools.accumulate(series.counts))
            histogram.add_metric(
                list(values), list(zip(self._les, cumulative, strict=True)), series.total
            )
            if counter is not None:
                counter.add_metric(list(values), cumulative[-1])
        yield histogram
        if counter is not None:
            yield counter


def build_info(registry: CollectorRegistry, component: str) -> None:
    info = Info("payhook_build", "payhook build information", registry=registry)
    info.info({"version": __version__, "component": component})
