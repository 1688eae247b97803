"""Whether a process should receive traffic now: one object per process owns the flag that
``/readyz`` answers from and the ``payhook_ready`` gauge, so the two can never disagree."""

from __future__ import annotations

from typing import final

from prometheus_client import CollectorRegistry, Gauge


@final
class Readiness:
    """The process's readiness: ``set`` changes the flag and the gauge together.

    ``shut_down`` marks the start of a graceful shutdown: not ready from that moment on, and
    ``shutting_down`` stays true so ``/readyz`` can say why.
    """

    __slots__ = ("_gauge", "_ready", "_shutting_down")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauge = Gauge("payhook_ready", "1 when /readyz answers 200", registry=registry)
        self._ready = False
        self._shutting_down = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def set(self, ready: bool) -> None:
        self._ready = ready
        self._gauge.set(1 if ready else 0)

    def shut_down(self) -> None:
        self._shutting_down = True
        self.set(False)
