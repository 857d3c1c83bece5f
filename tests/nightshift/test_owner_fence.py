"""The owner fence: each run that takes a run directory gets the next epoch, and a run whose
lease was taken over makes nothing more visible there; a lease from another host is judged by
this host's clock alone."""

import pytest

from nightshift.config import RuntimeSettings
from nightshift.errors import ConfigurationError
from nightshift.records import Lease, LeaseBeat
from nightshift.runtime.lease import LeaseLost, _alive, released, run_lease
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import written_whole

pytestmark = pytest.mark.fast


def lease_of(run_dir) -> Lease:
    return Lease.load(RunDir(run_dir).lease)


def test_every_run_that_takes_the_directory_gets_a_greater_epoch(tmp_path):
    with run_lease(RunDir(tmp_path)):
        assert lease_of(tmp_path).epoch == 1
    assert released(RunDir(tmp_path).lease, lease_of(tmp_path)), "released, and the lease keeps its epoch"
    with run_lease(RunDir(tmp_path)):
        assert lease_of(tmp_path).epoch == 2 and not released(RunDir(tmp_path).lease, lease_of(tmp_path))


def test_a_run_taken_over_while_it_let_go_leaves_the_new_owners_lease_alone(tmp_path, monkeypatch):
    """A run whose storage stalled (or that froze) past the TTL after its last beat is taken over
    before its release lands: the release names only its own claim, and the new owner, who had
    read the lease as its own, still owns the directory and may write there. (The release used to
    rewrite the lease it had read, marked released, over the new owner's.)"""
    import nightshift.records as records
    import nightshift.runtime.lease as lease

    run, writes, taken = RunDir(tmp_path), records.write_json_atomic, {}

    def taken_over_first(path, data):  # the release's write lands after the takeover's
        if taken.get("now") and "by" not in taken:
            taken["by"] = lease_of(tmp_path).model_copy(update={"token": "the-other-run", "host": "gpu-9", "epoch": 2})
            writes(run.lease, taken["by"].model_dump())
        writes(path, data)

    with run_lease(run):
        monkeypatch.setattr(records, "write_json_atomic", taken_over_first)
        taken["now"] = True
    monkeypatch.setattr(records, "write_json_atomic", writes)
    now = lease_of(tmp_path)
    assert now.token == "the-other-run" and not released(run.lease, now), "the new owner's lease stands"
    lease._held[str(tmp_path)] = now  # the new owner, by its fence, still owns the directory
    try:
        with written_whole(tmp_path / "report.json") as tmp:
            tmp.write_text("the new owner's")
    finally:
        lease._held.pop(str(tmp_path))
    assert (tmp_path / "report.json").read_text() == "the new owner's"


def test_a_run_whose_lease_was_taken_over_makes_nothing_visible_in_the_directory(tmp_path):
    chunk = tmp_path / "shards" / "abc" / "chunk-00000.parquet"
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other" / "file.txt"
    with run_lease(RunDir(tmp_path)):
        with written_whole(chunk) as tmp:
            tmp.write_text("mine")
        ours = lease_of(tmp_path)
        ours.model_copy(update={"token": "the-other-run", "host": "gpu-9", "epoch": ours.epoch + 1}).save(
            RunDir(tmp_path).lease
        )  # what a run that presumed this one dead writes

        with pytest.raises(LeaseLost, match=r"lease \(epoch 1\) was taken over by pid .* on gpu-9, .*\(epoch 2\)"):
            with written_whole(tmp_path / "output.jsonl") as tmp:
                tmp.write_text("late")
        with pytest.raises(LeaseLost):
            with written_whole(chunk) as tmp:
                tmp.write_text("late")
        with written_whole(elsewhere) as tmp:  # outside the directory: not this lease's business
            tmp.write_text("fine")

    assert not (tmp_path / "output.jsonl").exists() and chunk.read_text() == "mine"
    assert not list(tmp_path.rglob("*.tmp-*")), "no temporary file left behind"
    assert lease_of(tmp_path).token == "the-other-run", "the loser does not release the winner's lease"
    assert isinstance(LeaseLost("x"), ConfigurationError), "exit status 2, never retried"


def another_hosts_lease(heartbeat: float) -> Lease:
    return Lease(token="t", host="gpu-elsewhere", pid=1, pid_started=0.0, since="2026-12-01T00:00:00+00:00",
                 heartbeat=heartbeat, epoch=3)  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_another_hosts_lease_expires_only_after_a_ttl_of_this_hosts_clock_without_a_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_LEASE_TTL_S", "30")
    path = RunDir(tmp_path).lease
    # Its clock runs a day ahead of ours: compared with our clock, it would look alive for a day.
    stale = another_hosts_lease(heartbeat=2_000_000_000.0)
    stale.save(path)
    clock = FakeClock()
    assert not _alive(stale, path, clock=clock, sleep=clock.sleep)
    assert 30 <= clock.now < 32, "watched for one TTL, no more"

    beating = another_hosts_lease(heartbeat=1.0)  # a day behind: it would look dead at once
    beating.save(path)
    clock = FakeClock()

    def beat_once(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 5:
            beating.model_copy(update={"heartbeat": 2.0}).save(path)

    assert _alive(beating, path, clock=clock, sleep=beat_once)
    assert clock.now < 10, "alive as soon as its heartbeat moved"


def test_runtime_settings_come_from_the_environment_typed_and_checked(monkeypatch):
    assert RuntimeSettings.from_environment().lease_ttl_s == 60
    monkeypatch.setenv("NIGHTSHIFT_LEASE_TTL_S", "2.5")
    monkeypatch.setenv("NIGHTSHIFT_SIGTERM_GRACE_S", "0")
    assert RuntimeSettings.from_environment() == RuntimeSettings(lease_ttl_s=2.5, sigterm_grace_s=0)
    monkeypatch.setenv("NIGHTSHIFT_LEASE_TTL_S", "-1")
    with pytest.raises(ConfigurationError, match="NIGHTSHIFT_LEASE_TTL_S: Input should be greater than 0"):
        RuntimeSettings.from_environment()


def test_a_write_already_past_the_fence_when_the_run_froze_is_taken_back_when_it_wakes(tmp_path, monkeypatch):
    import nightshift.runtime.storage as storage

    run = RunDir(tmp_path)
    chunk = tmp_path / "shards" / "abc" / "chunk-00001.parquet"
    manifest = tmp_path / "shards" / "abc" / "manifest.json"
    synced = storage._synced

    def frozen_then_taken_over(path):  # between the fence's check and the rename
        synced(path)
        if ".tmp-" in path.name and not path.name.startswith("lease.json"):
            mine = Lease.load(run.lease)
            mine.model_copy(update={"token": "the-other-run", "epoch": mine.epoch + 1}).save(run.lease)

    with run_lease(RunDir(tmp_path)):
        monkeypatch.setattr(storage, "_synced", frozen_then_taken_over)
        with pytest.raises(LeaseLost):
            with written_whole(chunk) as tmp:
                tmp.write_text("late")
    assert not chunk.exists(), "the chunk that landed after the takeover is taken back"
    assert not list(tmp_path.rglob("*.tmp-*"))

    monkeypatch.setattr(storage, "_synced", synced)
    LeaseBeat(heartbeat=0, released=True).save(run.lease_beat(Lease.load(run.lease).token))  # the other run ended
    manifest.write_text("the new owner's")
    with run_lease(RunDir(tmp_path)):
        monkeypatch.setattr(storage, "_synced", frozen_then_taken_over)
        with pytest.raises(LeaseLost):
            with written_whole(manifest) as tmp:
                tmp.write_text("late")
    assert manifest.exists(), "a file that was there before is never deleted"


def test_a_stopping_process_waits_for_the_writes_in_flight_so_none_lands_after_it_is_gone(tmp_path, monkeypatch):
    """The CLI ends with os._exit: a chunk writer thread past the fence's check (a frozen VM woke
    mid-upload) would be cut off before its second check takes the write back, and its object
    would land after the process is gone — as a fresh-clone run of the frozen-lease test saw.
    settle_commits() holds the exit until every write in flight has passed its second check."""
    import threading

    import nightshift.runtime.storage as storage

    run = RunDir(tmp_path)
    chunk = tmp_path / "shards" / "abc" / "chunk-00002.parquet"
    synced, inside, wake = storage._synced, threading.Event(), threading.Event()

    def frozen_mid_write(path):
        synced(path)
        if ".tmp-" in path.name and not path.name.startswith("lease.json"):
            mine = Lease.load(run.lease)
            mine.model_copy(update={"token": "the-other-run", "epoch": mine.epoch + 1}).save(run.lease)
            inside.set()
            wake.wait(30)

    def writer(failures: list) -> None:
        try:
            with written_whole(chunk) as tmp:
                tmp.write_text("late")
        except LeaseLost as exc:
            failures.append(exc)

    failures: list = []
    with run_lease(RunDir(tmp_path)):
        monkeypatch.setattr(storage, "_synced", frozen_mid_write)
        thread = threading.Thread(target=writer, args=(failures,), daemon=True)
        thread.start()
        assert inside.wait(10)
        assert not storage.settle_commits(timeout=0.3), "a write in flight is not settled"
        threading.Timer(0.5, wake.set).start()
        assert storage.settle_commits(timeout=10)
        assert not chunk.exists(), "settled: the write that landed after the takeover is already taken back"
        thread.join(10)
        assert failures, "and its writer was told that the lease is lost"


def test_a_heartbeat_never_rewrites_the_lease_so_a_beat_frozen_mid_way_cannot_take_it_back(tmp_path, monkeypatch):
    """A beat that read the lease, froze (SIGSTOP, a paused VM) past the TTL while another run took
    the directory, then wrote its heartbeat into the lease it had read, gave the directory back to
    the frozen run: it then finished and published as if it owned it (seen in a loaded suite run
    of tests/test_lease.py). Beats go to the holder's own file, through the owner fence."""
    import time

    from nightshift.records import LeaseBeat

    monkeypatch.setenv("NIGHTSHIFT_LEASE_TTL_S", "0.4")  # a beat every 0.1 s
    run = RunDir(tmp_path)
    with run_lease(run):
        taken = run.lease.read_bytes()
        mine = lease_of(tmp_path)
        time.sleep(0.5)
        assert run.lease.read_bytes() == taken, "the beats left the lease as it was taken"
        beat = LeaseBeat.load(run.lease_beat(mine.token)).heartbeat
        assert beat > mine.heartbeat, "the holder's heartbeat moves in its own file"
        mine.model_copy(update={"token": "the-other-run", "epoch": mine.epoch + 1}).save(run.lease)  # taken over
        time.sleep(0.5)
        assert lease_of(tmp_path).token == "the-other-run", "no beat of the old holder took it back"
        assert LeaseBeat.load(run.lease_beat(mine.token)).heartbeat <= beat + 0.2, "the fence stopped its beats"
    assert lease_of(tmp_path).token == "the-other-run" and not released(run.lease, lease_of(tmp_path))


def test_a_progress_snapshot_of_a_run_since_taken_over_is_not_read_as_the_live_runs(tmp_path):
    """The fence cannot recall a write already past its first check when its run froze: a frozen
    run's progress.json write lands when it wakes, over the new owner's. Each snapshot carries its
    writer's lease epoch, and `nightshift status` and the Batch API's counts ignore one of an
    epoch the directory's lease has passed."""
    from nightshift.observe.status import _live_progress
    from nightshift.records import ProgressSnapshot
    from nightshift.runtime.lease import superseded
    from nightshift.runtime.progress import Progress

    run = RunDir(tmp_path)
    with run_lease(run):
        Progress(run, total=10, completed=3)  # it writes progress.json as it starts
        snapshot = ProgressSnapshot.load(run.progress)
        assert snapshot.epoch == 1 and _live_progress(run, 10) == snapshot
    assert _live_progress(run, 10) == snapshot, "a run that ended is not superseded"

    lease_of(tmp_path).model_copy(update={"epoch": 2, "token": "another-run"}).save(run.lease)  # taken over
    assert superseded(run, 1) and not superseded(run, 2) and not superseded(run, None)
    assert _live_progress(run, 10) is None, "the late snapshot of the run taken over is not the live run's"
