"""Specification of how the parent decides that a child run has lost its worker, from nothing but
the heartbeat file the child rewrites in the run directory: silence timed on the parent's own
clock, a failed read counting for nothing, a pending run judged by its start timeout."""

import json

import pytest

from nightshift.fleet.workers import HeartbeatWatch
from nightshift.runtime.rundir import RunDir

pytestmark = pytest.mark.fast

TIMEOUT_S, START_TIMEOUT_S = 30.0, 600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def child(tmp_path):
    clock = Clock()
    watch = HeartbeatWatch(RunDir(tmp_path), "g1", "run-1", TIMEOUT_S, START_TIMEOUT_S, clock=clock)
    beats = iter(range(10**6))

    def beat(worker_time: float) -> None:  # what the child's heartbeat thread writes
        watch.path.parent.mkdir(parents=True, exist_ok=True)
        watch.path.write_text(json.dumps({"host": "gpu-box", "heartbeat": worker_time, "n": next(beats)}))

    return watch, clock, beat


def test_a_beating_run_is_never_lost_even_when_its_workers_clock_is_an_hour_behind(child):
    watch, clock, beat = child
    for _ in range(20):
        beat(worker_time=clock.now - 3600)
        assert watch.lost(running=True) is None
        clock.now += 10


def test_a_run_whose_beat_stops_changing_is_lost_once_the_timeout_has_passed_on_the_parents_clock(child):
    watch, clock, beat = child
    beat(worker_time=clock.now)
    assert watch.lost(running=True) is None
    clock.now += TIMEOUT_S
    assert watch.lost(running=True) is None, "silent exactly the timeout: not yet"
    clock.now += 1
    assert watch.lost(running=True) == "no heartbeat for 30 s"


def test_a_run_that_never_beats_is_lost_a_timeout_after_it_was_first_seen_running_not_pending(child):
    watch, clock, _ = child
    assert watch.lost(running=False) is None
    clock.now += 500  # pending (a pod pulling its image): not counted against the heartbeat
    assert watch.lost(running=False) is None
    assert watch.lost(running=True) is None
    clock.now += TIMEOUT_S + 1
    assert "no heartbeat" in watch.lost(running=True)


def test_a_failed_read_says_nothing_and_the_silence_is_timed_afresh_after_it(child):
    watch, clock, beat = child
    beat(worker_time=clock.now)
    assert watch.lost(running=True) is None
    watch.path.unlink()
    watch.path.mkdir()  # reading it now fails with an error that is not "no such file"
    for _ in range(10):
        clock.now += TIMEOUT_S
        assert watch.lost(running=True) is None
    watch.path.rmdir()
    beat(worker_time=clock.now)
    assert watch.lost(running=True) is None
    clock.now += TIMEOUT_S + 1
    assert watch.lost(running=True) == "no heartbeat for 30 s"


def test_a_run_left_pending_past_its_start_timeout_is_lost(child):
    watch, clock, _ = child
    assert watch.lost(running=False) is None
    clock.now += START_TIMEOUT_S + 1
    assert watch.lost(running=False) == "taken by a worker but not started in 600 s"
