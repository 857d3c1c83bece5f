"""One budget for every Nightshift client of one engine server: the fleet's rows in flight.

A run with an online objective (`online_ttft_slo_ms`) adapts its own rows in flight to the time to
first token its probe measures (nightshift.engine.politeness). Three runs, the shard groups of a
fan-out and `serve`'s batches on one server would each grow their own, and together crowd out the
online traffic. With `fleet_budget` they share one budget, kept where every client already
reports: the Prefect server.

* **The fleet's limit** is a Prefect global concurrency limit, `nightshift-fleet-<server>`, shown
  in the UI. Its size follows one AIMD controller: every client probes, and a client steps the
  limit only when no other has stepped it since its own last look — about one step per probe
  interval for the whole fleet, however many clients.
* **A client's rows in flight are the slots it holds** under Prefect concurrency leases. It takes
  its fair share — the limit times its class's weight (urgent 4, nightly 2, backfill 1) over the
  live clients' weights, counted by a second limit (`nightshift-fleet-<server>-clients`) where
  each holds its weight in slots — and gives back what is over once those rows are done (a slot
  is never given back while its row is still at the server). Slots are taken only where the limit
  has room, so the clients together never hold more than it, nor have more rows at the server.
* **Nothing leaks**: the leases are renewed while the client lives and released when it ends; a
  client killed with slots in hand loses them when its leases expire (Prefect's shortest, 60 s).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from uuid import UUID

import httpx

from nightshift.engine.politeness import Aimd
from nightshift.errors import ConfigurationError

log = logging.getLogger(__name__)

LEASE_S = 60.0  # Prefect's shortest lease
RENEW_S = 20.0
LOCKED = 423  # Prefect's answer when the limit has no room


def limit_names(server: str) -> tuple[str, str]:
    """The fleet limit of `server` (an engine URL, never with its key) and its clients' limit."""
    key = hashlib.sha256(server.rstrip("/").encode()).hexdigest()[:12]
    return f"nightshift-fleet-{key}", f"nightshift-fleet-{key}-clients"


def fair_share(limit: int, weight: int, weights: int, most: int) -> int:
    """A client's slots of the fleet's `limit`: its `weight` over the live clients' `weights`
    (rounded down, so the shares add up to no more than the limit), at least one, at most `most`."""
    return min(most, max(1, limit * weight // max(weights, weight)))


class FleetBudget:
    """This client's part of the fleet budget of one server, on the Prefect server it reports to."""

    def __init__(self, server: str, most: int, start: int, weight: int = 1) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigurationError(
                "fleet_budget: the budget is shared through a Prefect server every client reaches; set "
                "PREFECT_API_URL (a run's temporary server is its own, shared with no one)"
            )
        self.name, self.clients_name = limit_names(server)
        self.most, self.weight, self.leases, self._lock = most, weight, [], threading.Lock()
        self._seen: int | None = None
        self._aimd = Aimd(most)
        self._renewed = time.monotonic()
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self._create(self.name, min(start, most))
        self._create(self.clients_name, 1_000_000)
        self._member = self._take(self.clients_name, weight)

    def _create(self, name: str, limit: int) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            self.client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except (ObjectAlreadyExists, httpx.HTTPStatusError):
            # another client made it first (or at the same moment: a conflict the server may answer
            # with a 500): its size is the fleet's, not reset here — and it must be there now
            self.client.read_global_concurrency_limit_by_name(name)

    def _take(self, name: str, slots: int = 1) -> UUID | None:
        """`slots` of `name` under one lease, or None where the limit has no room."""
        try:
            response = self.client.increment_concurrency_slots_with_lease([name], slots, "concurrency", LEASE_S)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == LOCKED:
                return None
            raise
        return UUID(response.json()["lease_id"])

    def look(self, online_ttft_ms: float | None, objective_ms: float, in_flight: int = 0) -> int:
        """One look: the fleet's limit stepped (if no other client has since this one's last look),
        this client's slots brought to its fair share where the limit has room; returns how many
        rows it may have in flight — its share, of the slots it holds. A slot is given back only
        once its row is done: with `in_flight` rows still at the server, it keeps that many."""
        with self._lock:
            limit = self._stepped(online_ttft_ms, objective_ms)
            weights = self.client.read_global_concurrency_limit_by_name(self.clients_name).active_slots
            share = fair_share(limit, self.weight, weights, self.most)
            while len(self.leases) > max(share, in_flight):
                self.client.release_concurrency_slots_with_lease(self.leases.pop())
            while len(self.leases) < share and (lease := self._take(self.name)) is not None:
                self.leases.append(lease)
            self._renew()
            return min(share, len(self.leases))

    def _stepped(self, online_ttft_ms: float | None, objective_ms: float) -> int:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        limit = self.client.read_global_concurrency_limit_by_name(self.name).limit
        if online_ttft_ms is not None and self._seen in (None, limit):
            stepped = self._aimd.step(limit, online_ttft_ms, objective_ms)
            if stepped != limit:
                self.client.update_global_concurrency_limit(self.name, GlobalConcurrencyLimitUpdate(limit=stepped))
            limit = stepped
        self._seen = limit
        return limit

    def _renew(self) -> None:
        if time.monotonic() - self._renewed < RENEW_S:
            return
        for lease in [*self.leases, self._member]:
            if lease is not None:
                self.client.renew_concurrency_lease(lease, LEASE_S)
        self._renewed = time.monotonic()

    def close(self) -> None:
        """Every slot given back: the fleet's other clients may take them at once."""
        with self._lock:
            try:
                for lease in [*self.leases, self._member]:
                    if lease is not None:
                        self.client.release_concurrency_slots_with_lease(lease)
            except Exception as exc:  # their leases expire within LEASE_S anyway
                log.warning("could not give back the fleet budget's slots (they expire within %.0f s): %s",
                            LEASE_S, exc)  # fmt: skip
            self.leases, self._member = [], None
            self.client.__exit__(None, None, None)
