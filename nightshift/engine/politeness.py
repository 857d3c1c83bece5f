"""Polite on a shared server: how many of the batch's rows may be in flight at once, adapted so
that the server's online traffic keeps its time to first token (TTFT) within an objective.

Additive increase, multiplicative decrease, as TCP shares a link: every `interval_s` a probe — a
one-token request at the online traffic's own priority — measures the TTFT an online request
meets right now. Over the objective, half as many rows may be in flight (at least one). Within
it, one more (up to the cap) — at every look until the first overload, as TCP's slow start; after
it, once per `passes_to_grow(limit)` looks within, so that the objective holds for the online
traffic's 95th percentile, not just for most probes (`Aimd`). The probe sees what online
traffic sees; the server's own TTFT histogram (`/metrics`) cannot: it mixes in the batch's rows,
whose TTFT under priority scheduling is long by design, and a Prometheus histogram keeps no
labels to tell them apart.

With `fleet_budget` the step is taken once for every client of the server and each client's limit
is its share of the fleet's (nightshift.engine.fleet).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
START_IN_FLIGHT = 4  # a shared server is met gently: the limit grows from here while online traffic keeps its objective
HELD_SHARE = 0.95  # the objective is the online traffic's p95: the share of its requests that keep to it


def passes_to_grow(limit: int, held: float = HELD_SHARE) -> int:
    """Looks within the objective per step up at `limit` rows in flight, once past the first
    overload: held/(1-held) looks per row earned back (19 for the p95) spread over the limit, so
    that a look over the objective (which halves the limit) comes about once in 1/(1-held) looks.
    On a simulated server (tests/nightshift/test_politeness.py: TTFT growing with the rows in
    flight, at several slopes and noise levels) about 5 % of the looks are over the objective;
    with a plain +1 per look, 7-17 % — the objective held only for the 83rd-93rd percentile."""
    return max(1, math.ceil(held / ((1 - held) * max(1, limit))))


@dataclass
class Aimd:
    """The step rule, for one run's limit or a fleet's: the limit after one look."""

    most: int
    ramping: bool = True  # until the first overload: one more at every look within
    within: int = 0  # looks within the objective since the last step

    def step(self, limit: int, online_ttft_ms: float | None, objective_ms: float) -> int:
        if online_ttft_ms is None:
            return limit
        if online_ttft_ms > objective_ms:
            self.ramping, self.within = False, 0
            return max(1, limit // 2)
        self.within += 1
        if self.ramping or self.within >= passes_to_grow(limit):
            self.within = 0
            return min(self.most, limit + 1)
        return limit


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
        self.aimd = Aimd(most)
        self.looks: list[Look] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, online_ttft_ms: float | None) -> int:
        """One step (`Aimd`): over the objective half as many, within it more; no measurement, no
        change. In a fleet the step is the fleet's and the limit this client's share of it."""
        if self.fleet is not None:
            self.limit = self._fleet_look(online_ttft_ms)
        else:
            self.limit = self.aimd.step(self.limit, online_ttft_ms, self.objective_ms)
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
