"""Who counts as alive (nightshift/runtime/processes.py), wherever Nightshift asks: the shared temporary
Prefect server's supervisor and clients, a run directory's lease holder, a killed server's run.

A process killed outright whose parent is gone is reparented, and on a machine whose first
process does not reap orphans (a container without an init, as on these machines) it stays a
zombie: it still has a pid and a start time, but it does nothing. The next run must start a new
server, take the run directory at once, and kill what the dead run left — not wait for the dead."""

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nightshift.batch_api.local_process import _kill_leftovers
from nightshift.batch_api.store import BatchObject, StoredBatch
from nightshift.records import Lease
from nightshift.runtime.lease import _alive
from nightshift.runtime.local_prefect import Place
from nightshift.runtime.processes import started_at, still_runs

pytestmark = pytest.mark.fast


def _key_when_alive(pid: int) -> str:
    """The key the place recorded while the process ran: its pid and start time."""
    return f"{pid}-{psutil.Process(pid).create_time():.2f}"


def _zombie(command=("sleep", "0.5"), **popen) -> tuple[subprocess.Popen, str]:
    """A child that has exited and that nobody has waited for, and its key from when it ran."""
    child = subprocess.Popen(list(command), **popen)
    key = _key_when_alive(child.pid)
    _wait_until_zombie(child.pid)
    return child, key


def _wait_until_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError("the child did not exit")


def test_a_zombie_has_no_start_time_and_does_not_still_run():
    zombie, key = _zombie()
    try:
        started = float(key.partition("-")[2])
        assert started_at(zombie.pid) is None and not still_runs(zombie.pid, started)
    finally:
        zombie.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        started = started_at(live.pid)
        assert started is not None and still_runs(live.pid, started)
        assert not still_runs(live.pid, started - 10), "another process that had the same pid"
    finally:
        live.kill()
        live.wait()


def test_a_supervisor_that_is_a_zombie_is_no_server_and_a_zombie_client_is_not_alive(tmp_path):
    place = Place(tmp_path)
    zombie, key = _zombie()
    try:
        place.clients.mkdir(parents=True, exist_ok=True)
        (place.clients / key).touch()  # registered while it ran
        place.state.write_text(json.dumps({"pid": zombie.pid, "key": key, "url": "http://x/api"}))
        assert place.server() is None, "a zombie supervisor serves nothing: a new server must start"
        assert place.live_clients() == [], "a zombie client keeps no server alive"
    finally:
        zombie.wait()


def test_a_live_supervisor_is_the_server(tmp_path):
    place = Place(tmp_path)
    live = subprocess.Popen(["sleep", "30"])
    try:
        place.root.mkdir(parents=True, exist_ok=True)
        known = {"pid": live.pid, "key": _key_when_alive(live.pid), "url": "http://x/api"}
        place.state.write_text(json.dumps(known))
        assert place.server() == known
    finally:
        live.kill()
        live.wait()


def test_a_lease_held_by_a_zombie_of_this_host_holds_nothing_even_with_a_fresh_heartbeat(tmp_path):
    """kill -9 of a run, then a re-run at once: the directory is taken over now, not after the TTL."""
    zombie, key = _zombie()
    try:
        lease = Lease(token="t", host=socket.gethostname(), pid=zombie.pid, pid_started=float(key.partition("-")[2]),
                      since="2026-12-07T00:00:00+00:00", heartbeat=time.time(), epoch=1)  # fmt: skip
        assert not _alive(lease, tmp_path / "lease.json")
        assert _alive(lease.model_copy(update={"pid": os.getpid(), "pid_started": started_at(os.getpid())}),
                      tmp_path / "lease.json"), "a live holder with a fresh heartbeat holds the directory"  # fmt: skip
    finally:
        zombie.wait()


def test_what_a_run_left_is_killed_when_the_run_itself_is_a_zombie():
    """The server was killed with -9 and its run died with it, unreaped: its engine-like child lives on."""
    code = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    stored = _stored_run(leader.pid, psutil.Process(leader.pid).create_time())
    _wait_until_zombie(leader.pid)
    try:
        left = [p for p in psutil.process_iter() if p.pid != leader.pid and _group(p.pid) == leader.pid]
        assert left, "the child outlived its leader"
        _kill_leftovers(stored)
        gone, alive = psutil.wait_procs(left, timeout=5)
        assert not alive, "a zombie run's engine processes were left running"
    finally:
        leader.wait()


def _stored_run(group: int, started: float) -> StoredBatch:
    batch = BatchObject(id="batch_" + "0" * 24, endpoint="/v1/chat/completions", input_file_id="file-" + "0" * 24,
                        completion_window="24h", created_at=int(started), expires_at=int(started) + 3600)  # fmt: skip
    return StoredBatch(batch=batch, owner="o", run_group=group, run_host=socket.gethostname(), run_started=started)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
