"""Polite on a shared server: how many of the batch's rows may be in flight at once, adapted so
that the server's online traffic keeps its time to first token (TTFT) within an objective.

Additive increase, multiplicative decrease, as TCP shares a link: every `interval_s` a probe — a
one-token request at the online traffic's own priority — measures the TTFT an online request
meets right now. Within the objective, one more row may be in flight (up to the cap); over it,
half as many (at least one). The probe sees what online traffic sees; the server's own TTFT
histogram (`/metrics`) cannot: it mixes in the batch's rows, whose TTFT under priority
scheduling is long by design, and a Prometheus histogram keeps no labels to tell them apart.

With `fleet_budget` the step is taken once for every client of the server and each client's limit
is its share of the fleet's (nightshift.engine.fleet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
START_IN_FLIGHT = 4  # a shared server is met gently: the limit grows from here while online traffic keeps its objective


@dataclass(frozen=True)
class Look:
    """One probe: when (time.time()), what it measured, the in-flight limit after it."""

    at: float
    online_ttft_ms: float | None
    in_flight_limit: int


class ConcurrencyController:
    """The batch's in-flight limit against an online TTFT objective (`objective_ms`), capped at
    `most`. `probe()` returns the TTFT it measured in milliseconds, or None when it could not."""

    def __init__(
        self,
        probe: Callable[[], float | None],
        objective_ms: float,
        most: int,
        interval_s: float = PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        fleet=None,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.probe, self.objective_ms, self.most, self.interval_s, self.clock = (
            probe,
            objective_ms,
            most,
            interval_s,
            clock,
        )
        self.fleet = fleet  # a FleetBudget (nightshift.engine.fleet): the limit is the slots it holds
        self.in_flight = in_flight  # the client's rows at the server now: a fleet slot outlives its row
        self.limit = fleet.look(None, objective_ms) if fleet is not None else min(most, START_IN_FLIGHT)
        self.looks: list[Look] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, online_ttft_ms: float | None) -> int:
        """One step: within the objective one more, over it half as many; no measurement, no change.
        In a fleet the step is the fleet's and the limit this client's share of it."""
        if self.fleet is not None:
            self.limit = self._fleet_look(online_ttft_ms)
        elif online_ttft_ms is not None:
            self.limit = (
                max(1, self.limit // 2) if online_ttft_ms > self.objective_ms else min(self.most, self.limit + 1)
            )
        ttft = None if online_ttft_ms is None else round(online_ttft_ms, 1)
        self.looks.append(Look(round(self.clock(), 3), ttft, self.limit))
        return self.limit

    def _fleet_look(self, online_ttft_ms: float | None) -> int:
        try:
            return self.fleet.look(online_ttft_ms, self.objective_ms, self.in_flight())
        except Exception as exc:  # the Prefect server out of reach a moment: the slots held stay held
            log.warning("the fleet budget could not be read (%s): %d rows in flight meanwhile", exc, self.limit)
            return self.limit

    def start(self) -> ConcurrencyController:
        self._thread = threading.Thread(target=self._loop, name="nightshift-politeness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.fleet is not None:
            self.fleet.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.observe(self.probe())
