"""One live run per run directory.

Two runs on the same directory would generate every shard twice. A run holds `RUN_DIR/lease.json`
(host, pid, since, a heartbeat every few seconds) while it runs; a second run on a live
directory is refused with a message naming the live one. A dead run's lease does not block a
resume: on the same host a lease whose process is gone is taken over at once (kill -9, then
re-run), elsewhere a lease whose heartbeat is older than LEASE_TTL_S has expired.

The lease is re-entrant within a process: `nightshift run` takes it before the engine starts
loading, and the flow it runs takes the same one (a deployment's flow run takes its own).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from nightshift.config import ConfigurationError
from nightshift.records import Lease
from nightshift.rundir import RunDir

LEASE_TTL_S = 60.0
HEARTBEAT_S = 5.0
_held: dict[str, str] = {}  # run directory → this process's lease token
_lock = threading.Lock()


class RunDirectoryBusy(ConfigurationError):
    """Another live run holds the run directory."""


@contextmanager
def run_lease(run_dir: str | Path, flow_run_id: str | None = None):
    """Hold the run directory's lease while the body runs (re-entrant within a process)."""
    root = RunDir(run_dir).root
    path = RunDir(run_dir).lease
    with _lock:
        if str(root) in _held:
            outer = True
        else:
            outer = False
            _held[str(root)] = _acquire(path, flow_run_id)
    if outer:
        yield
        return
    token = _held[str(root)]
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(path, token, stop), name="nightshift-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        with _lock:
            _held.pop(str(root), None)
        if _owner(path) == token:
            path.unlink(missing_ok=True)


def _acquire(path: Path, flow_run_id: str | None) -> str:
    current = _read(path)
    if current is not None and _alive(current):
        raise RunDirectoryBusy(f"{path.parent} is being run by {current.describe()}; wait for it to end or stop it")
    token = uuid.uuid4().hex
    _lease(token, flow_run_id).save(path)
    time.sleep(0.2)  # two runs that wrote at once: the later rename wins, the other sees it and yields
    winner = _read(path)
    if winner is None or winner.token != token:
        taken_by = winner.describe() if winner else "another run"
        raise RunDirectoryBusy(f"{path.parent} was just taken by {taken_by}")
    return token


def _lease(token: str, flow_run_id: str | None) -> Lease:
    import psutil

    return Lease(
        token=token,
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_started=psutil.Process().create_time(),
        flow_run_id=flow_run_id,
        since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        heartbeat=time.time(),
    )


def _beat(path: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        current = _read(path)
        if current is None or current.token != token:
            return  # taken over (this run was presumed dead): nothing of ours to keep alive
        current.model_copy(update={"heartbeat": time.time()}).save(path)


def _alive(lease: Lease) -> bool:
    if time.time() - lease.heartbeat > LEASE_TTL_S:
        return False
    if lease.host == socket.gethostname():
        import psutil

        try:
            return abs(psutil.Process(lease.pid).create_time() - lease.pid_started) < 1
        except psutil.Error:
            return False
    return True


def _read(path: Path) -> Lease | None:
    try:
        return Lease.load(path)
    except (OSError, ValueError):
        return None


def _owner(path: Path) -> str | None:
    current = _read(path)
    return current.token if current else None
