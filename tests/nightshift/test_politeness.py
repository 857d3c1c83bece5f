"""Specification of the politeness controller: the batch's rows in flight grow by one while the
online traffic's time to first token is within its objective, halve when it is not, stay put when
the probe measured nothing, and never leave [1, the cap]."""

import pytest

from nightshift.engine.politeness import START_IN_FLIGHT, ConcurrencyController

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
