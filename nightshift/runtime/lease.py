"""One live run per run directory, and an owner fence for a run presumed dead that comes back.

Two runs on the same directory would generate every shard twice. A run holds `RUN_DIR/lease.json`
(host, pid, since, an epoch, a heartbeat every few seconds) while it runs; a second run on a live
directory is refused with a message naming the live one. A dead run's lease does not block a
resume: on the same host a lease whose process is gone is taken over at once (kill -9, then
re-run), and one whose heartbeat is older than the TTL (`NIGHTSHIFT_LEASE_TTL_S`, 60 s) has
expired. A lease written on another host is judged by this host's clock only: it has expired once
its heartbeat has not changed for a TTL of watching — two hosts' clocks are never compared.

The fence: every run that takes the directory writes the next epoch, and every file this process
makes visible under a directory it leased — chunk files, shard manifests, the merged outputs, the
report — first checks that the lease is still its own (nightshift.runtime.storage's commit fence). A run
frozen past its TTL (a stopped VM, a long pause) and taken over meanwhile comes back to find the
lease another's: it stops with LeaseLost (exit status 2) and makes nothing more visible. A write
already past the check when it froze (an upload under way) is checked again once it lands, and a
file it added is taken back (a chunk taken back after the new owner counted it only makes that
shard's checkpoint fail its file check, so the shard is redone, never lost). The rows it
committed before it froze are whole chunks, which the merge counts once.

The lease is re-entrant within a process: `nightshift run` takes it before the engine starts
loading, and the flow it runs takes the same one (a deployment's flow run takes its own).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from nightshift.config import RuntimeSettings
from nightshift.errors import ConfigurationError
from nightshift.records import Lease, LeaseBeat
from nightshift.runtime.processes import started_at, still_runs
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import add_commit_fence, is_device_full, is_url, location, read_fresh

log = logging.getLogger("nightshift.lease")

HEARTBEAT_S = 5.0
_held: dict[str, Lease] = {}  # run directory → this process's lease of it
_lock = threading.Lock()


class RunDirectoryBusy(ConfigurationError):
    """Another live run holds the run directory."""


class LeaseLost(ConfigurationError):
    """This run's lease was taken over while it could not renew it: another run owns the
    directory now, and this one must make nothing more visible in it."""


def lease_ttl_s() -> float:
    return RuntimeSettings.from_environment().lease_ttl_s


def _heartbeat_s() -> float:
    return min(HEARTBEAT_S, lease_ttl_s() / 4)


@contextmanager
def run_lease(run_dir: RunDir, flow_run_id: str | None = None):
    """Hold the run directory's lease while the body runs (re-entrant within a process)."""
    root, path = run_dir.root, run_dir.lease
    with _lock:
        if str(root) in _held:
            outer = True
        else:
            outer = False
            _held[str(root)] = _acquire(path, flow_run_id)
    if outer:
        yield
        return
    mine = _held[str(root)]
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(run_dir, mine.token, stop), name="nightshift-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=lease_ttl_s())  # no beat of it lands after the release
        with _lock:
            _held.pop(str(root), None)
        current = _read(path)
        if current is not None and current.token == mine.token:  # a run taken over writes nothing more
            _let_go(run_dir, mine.token)


def _let_go(run_dir: RunDir, token: str) -> None:
    """Release the directory in the holder's own beat file, never in the lease: a run frozen (or
    its storage stalled) past the TTL after its last beat may have been taken over before this
    write lands, and a released lease written then would have replaced the new owner's — which
    its next fence check would read as taken over, stopping the live run. The next run to take
    the directory removes the file. On a full disk the file is rewritten in its own block; where
    even that fails, the next run here takes the directory at once (its process is gone), one
    elsewhere after a TTL of watching."""
    path, release = run_dir.lease_beat(token), LeaseBeat(heartbeat=time.time(), released=True)
    try:
        release.save(path)
    except OSError as exc:
        if is_url(path) or not is_device_full(exc):
            raise
        try:
            with open(path, "r+b") as handle:
                handle.write(release.model_dump_json().encode())
                handle.truncate()
        except OSError as again:
            log.warning("%s: the release was not written (%r); the directory is free once this process ends",
                        run_dir.root, again)  # fmt: skip


def held_epoch(run_dir: RunDir) -> int | None:
    """The epoch of the lease this process holds on `run_dir`; None where it holds none."""
    mine = _held.get(str(run_dir.root))
    return mine.epoch if mine else None


def superseded(run_dir: RunDir, epoch: int | None) -> bool:
    """Whether what a run wrote under lease `epoch` comes from a run since taken over. The fence
    cannot recall a write already past its first check when its run froze: that write lands when
    the run wakes, and readers of live files (progress.json) use this to ignore it."""
    if epoch is None:
        return False
    current = _read(run_dir.lease)
    return current is not None and current.epoch > epoch


def check_owner(target: str) -> bool:
    """The commit fence: refuse to make `target` visible under a run directory this process
    leased and no longer owns; whether `target` lies under one it leased at all."""
    if not is_url(target):
        target = str(Path(target).resolve())
    guarded = False
    for root, mine in list(_held.items()):
        if not target.startswith(root.rstrip("/") + "/") or target == str(RunDir(root).lease):
            continue
        guarded, current = True, _read(RunDir(root).lease)
        if current is None or current.token != mine.token:
            taken = f"{current.describe()}" if current else "another run (its lease is gone)"
            raise LeaseLost(
                f"{root}: this run's lease (epoch {mine.epoch}) was taken over by {taken} while this run could "
                f"not renew it (frozen or cut off for over {lease_ttl_s():.0f} s); it stops here and makes "
                "nothing more visible — the other run owns the directory"
            )
    return guarded


add_commit_fence(check_owner)


def _acquire(path: Path, flow_run_id: str | None) -> Lease:
    current = _read(path)
    if current is not None and _alive(current, path):
        raise RunDirectoryBusy(f"{path.parent} is being run by {current.describe()}; wait for it to end or stop it")
    current = _read(path) or current  # the latest epoch, after any watching
    mine = _lease(uuid.uuid4().hex, flow_run_id, epoch=(current.epoch if current else 0) + 1)
    mine.save(path)
    time.sleep(0.2)  # two runs that wrote at once: the later rename wins, the other sees it and yields
    winner = _read(path)
    if winner is None or winner.token != mine.token:
        taken_by = winner.describe() if winner else "another run"
        raise RunDirectoryBusy(f"{path.parent} was just taken by {taken_by}")
    if current is not None and not released(path, current):
        log.warning("took over %s from %s, presumed dead", path.parent, current.describe())
    if current is not None:
        _forget_beat(RunDir(path.parent), current.token)
    return mine


def _lease(token: str, flow_run_id: str | None, epoch: int) -> Lease:
    return Lease(
        token=token,
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_started=started_at(os.getpid()),
        flow_run_id=flow_run_id,
        since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        heartbeat=time.time(),
        epoch=epoch,
    )


def _beat(run_dir: RunDir, token: str, stop: threading.Event) -> None:
    """Renew the lease: write this holder's own heartbeat file, never the lease itself. The write
    passes the owner fence (checked before and after it lands), so a beat frozen past the TTL and
    taken over meanwhile writes nothing when it wakes — had it rewritten the lease it read before
    the freeze, it would have taken the directory back from its new owner."""
    while not stop.wait(_heartbeat_s()):
        try:
            LeaseBeat(heartbeat=time.time()).save(run_dir.lease_beat(token))
        except LeaseLost:
            return  # taken over (this run was presumed dead): the fence stops its other writes too
        except OSError as exc:  # a storage hiccup: the next beat tries again
            log.warning("lease heartbeat not written: %r", exc)


def _forget_beat(run_dir: RunDir, token: str) -> None:
    try:
        location(run_dir.lease_beat(token)).unlink(missing_ok=True)
    except OSError:
        pass


def _beat_of(path: Path, lease: Lease) -> LeaseBeat:
    """The holder's latest beat: its beat file's, else (none yet, or torn) when it took the directory."""
    try:
        beat = LeaseBeat.model_validate_json(read_fresh(RunDir(path.parent).lease_beat(lease.token)))
    except (OSError, ValueError):
        return LeaseBeat(heartbeat=lease.heartbeat, released=lease.released)
    return beat.model_copy(
        update={"heartbeat": max(beat.heartbeat, lease.heartbeat), "released": beat.released or lease.released}
    )


def released(path: Path, lease: Lease) -> bool:
    """Whether the holder let go (in its beat file; `Lease.released` in directories of older runs)."""
    return _beat_of(path, lease).released


def _alive(lease: Lease, path: Path, clock=time.monotonic, sleep=time.sleep) -> bool:
    """Whether the lease's holder still runs: on this host by its process and this clock; from
    another host by watching whether its heartbeat moves within a TTL of this host's clock."""
    first = _beat_of(path, lease)  # one read of the beat file per look
    if first.released:
        return False
    ttl = lease_ttl_s()
    if lease.host == socket.gethostname():  # a zombie holder (killed, never reaped) holds nothing
        return still_runs(lease.pid, lease.pid_started) and time.time() - first.heartbeat <= ttl
    log.warning("%s was run by %s: watching its lease for up to %.0f s to see whether it lives", path.parent,
                lease.describe(), ttl)  # fmt: skip
    until = clock() + ttl
    while clock() < until:
        sleep(min(1.0, ttl / 10))
        now = _read(path)
        if now is None:
            return False
        beat = _beat_of(path, now)
        if now.token != lease.token or beat.heartbeat != first.heartbeat or beat.released:
            return not beat.released  # it beat (or another took it): alive; it let go meanwhile: free
    return False


def _read(path: Path, attempts: int = 3) -> Lease | None:
    """The lease as it is now; None when there is none (or it stays unreadable: a half-written
    lease from a run killed while writing it holds nobody)."""
    for attempt in range(attempts):
        try:
            return Lease.model_validate_json(read_fresh(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # a storage hiccup, or a torn read: look again
            time.sleep(0.2 * (attempt + 1))
    return None
