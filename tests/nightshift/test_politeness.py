"""Specification of the politeness controller: the batch's rows in flight grow by one while the
online traffic's time to first token is within its objective (at every look until the first
overload, then more slowly, so that the objective holds for the online p95), halve when it is
not, stay put when the probe measured nothing, and never leave [1, the cap]."""

import math
import random

import pytest

from nightshift.engine.politeness import START_IN_FLIGHT, Aimd, ConcurrencyController, passes_to_grow

pytestmark = pytest.mark.fast


def controller(most: int = 16) -> ConcurrencyController:
    return ConcurrencyController(probe=lambda: None, objective_ms=100, most=most, clock=iter(range(1000)).__next__)


def test_within_the_objective_one_more_row_each_look_up_to_the_cap():
    polite = controller(most=6)
    assert polite.limit == START_IN_FLIGHT == 4
    assert [polite.observe(40.0) for _ in range(4)] == [5, 6, 6, 6]


def test_over_the_objective_half_as_many_never_fewer_than_one():
    polite = controller()
    for _ in range(8):
        polite.observe(50.0)
    assert polite.limit == 12
    assert [polite.observe(250.0) for _ in range(5)] == [6, 3, 1, 1, 1]


def test_a_probe_that_measured_nothing_changes_nothing_and_every_look_is_kept():
    polite = controller()
    assert polite.observe(None) == 4
    polite.observe(150.0)
    assert [(look.online_ttft_ms, look.in_flight_limit) for look in polite.looks] == [(None, 4), (150.0, 2)]
    assert [look.at for look in polite.looks] == [0, 1]


def test_a_cap_below_the_start_starts_at_the_cap():
    assert controller(most=2).limit == 2


def test_after_the_first_overload_a_step_up_takes_more_looks_within_the_fewer_rows_in_flight():
    polite = controller(most=64)
    for _ in range(16):
        polite.observe(50.0)
    assert polite.observe(250.0) == 10
    looks = 0
    while polite.limit == 10:
        polite.observe(50.0)
        looks += 1
    assert looks == passes_to_grow(10) == 2 and polite.limit == 11
    assert [passes_to_grow(n) for n in (1, 4, 19, 20, 64)] == [19, 5, 1, 1, 1]


def _share_over(rule, slope: float, noise: float, looks: int = 20_000) -> float:
    """A simulated server whose online TTFT grows with the batch's rows in flight, with noise:
    the share of looks over a 150 ms objective once the controller has settled."""
    rng, limit, over = random.Random(7), START_IN_FLIGHT, 0
    for look in range(looks):
        ttft = 40 * (1 + limit / slope) * math.exp(rng.gauss(0, noise))
        limit = rule(limit, ttft)
        over += look >= 1000 and ttft > 150
    return over / (looks - 1000)


@pytest.mark.parametrize(("slope", "noise"), [(5, 0.1), (5, 0.4), (10, 0.25), (10, 0.4)])
def test_the_objective_holds_for_about_the_95th_percentile_of_looks_where_plus_one_a_look_does_not(slope, noise):
    aimd = Aimd(most=64)
    held = _share_over(lambda limit, ttft: aimd.step(limit, ttft, 150), slope, noise)
    plain = _share_over(lambda limit, ttft: max(1, limit // 2) if ttft > 150 else min(64, limit + 1), slope, noise)
    assert held <= 0.06, f"{held:.1%} of looks over the objective"
    assert plain > 0.07, f"+1 a look: {plain:.1%} over (the rule this replaced)"
