"""A deadline as users write one: a duration, a time of day, a date-time; anything else is
refused before any work starts."""

import time
from datetime import datetime, timedelta, timezone

import pytest

from nightshift.errors import ConfigurationError
from nightshift.runtime.deadline import DeadlineTimer, StopSignal, deadline_reached, parse_deadline

pytestmark = pytest.mark.fast

NOW = datetime(2026, 11, 26, 22, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6h", NOW + timedelta(hours=6)),
        ("90m", NOW + timedelta(minutes=90)),
        ("1h30m", NOW + timedelta(minutes=90)),
        ("45s", NOW + timedelta(seconds=45)),
        ("0.5h", NOW + timedelta(minutes=30)),
        ("08:00+00:00", datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)),  # tomorrow: 08:00 today has passed
        ("23:15+00:00", datetime(2026, 11, 26, 23, 15, tzinfo=timezone.utc)),  # later today
        ("2026-11-27T08:00+01:00", datetime(2026, 11, 27, 7, 0, tzinfo=timezone.utc)),
        ("2026-11-27 06:00Z", datetime(2026, 11, 27, 6, 0, tzinfo=timezone.utc)),
    ],
)
def test_a_deadline_is_a_duration_a_time_of_day_or_a_date_time(text, expected):
    assert parse_deadline(text, now=NOW) == expected


def test_a_time_of_day_without_an_offset_is_the_machines_local_time():
    now = datetime.now().astimezone()
    moment = parse_deadline("08:00", now=now)
    assert moment.tzinfo is not None and (moment.hour, moment.minute) == (8, 0)
    assert now < moment <= now + timedelta(days=1)


@pytest.mark.parametrize("text", ["", "tomorrow", "6 hours", "25:00", "h", "-5m", "2026-13-01T00:00"])
def test_anything_else_is_a_configuration_error_that_names_the_forms(text):
    with pytest.raises(ConfigurationError, match="duration .* time of day .* ISO date-time"):
        parse_deadline(text, now=NOW)


def test_the_timer_sets_the_deadline_when_it_comes_and_clears_it_after_the_run():
    with DeadlineTimer(datetime.now().astimezone() + timedelta(seconds=0.3)):
        assert not deadline_reached.is_set()
        assert deadline_reached.wait(5)
    assert not deadline_reached.is_set()  # a later run in this process starts clean


def test_a_deadline_already_passed_stops_at_once_and_no_deadline_never_does():
    with DeadlineTimer(datetime(2020, 1, 1, tzinfo=timezone.utc)):
        assert deadline_reached.wait(2)
    with DeadlineTimer(None):
        time.sleep(0.1)
        assert not deadline_reached.is_set()


def test_generation_stops_for_either_sigterm_or_the_deadline():
    import threading

    sigterm, deadline = threading.Event(), threading.Event()
    stop = StopSignal(sigterm, deadline)
    assert not stop.is_set()
    deadline.set()
    assert stop.is_set()
