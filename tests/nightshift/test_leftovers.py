"""A restarted `nightshift serve` kills what its killed predecessor's run left behind — the run's
process group — and nothing else: a pid is reused (32,768 of them on many hosts), and a process
that took the run's number later is another program's."""

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nightshift.batch_api.local_process import _kill_leftovers
from nightshift.batch_api.store import BatchObject, StoredBatch

pytestmark = pytest.mark.fast


def stored_run(group: int, started: float) -> StoredBatch:
    batch = BatchObject(id="batch_" + "0" * 24, endpoint="/v1/chat/completions", input_file_id="file-" + "0" * 24,
                        completion_window="24h", created_at=int(started), expires_at=int(started) + 3600)  # fmt: skip
    return StoredBatch(batch=batch, owner="o", run_group=group, run_host=socket.gethostname(), run_started=started)


def sleeper(**popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **popen)


def test_a_process_group_whose_leader_lives_is_not_the_dead_runs_and_is_left_alone():
    """The case of a reused pid: the recorded run group's number is now a live leader's."""
    other = sleeper(start_new_session=True)
    try:
        _kill_leftovers(stored_run(other.pid, time.time() - 5))
        time.sleep(0.2)
        assert other.poll() is None, "another program's process group was killed"
    finally:
        other.kill()
        other.wait()


def test_what_a_dead_run_left_in_its_group_is_killed():
    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "time.sleep(0.5)"], start_new_session=True)  # fmt: skip
    started = psutil.Process(leader.pid).create_time()
    group = leader.pid
    leader.wait()  # the run is gone; its engine-like child is left in the group
    left = [p for p in psutil.process_iter() if _group(p.pid) == group]
    assert left, "the child outlived its leader"
    _kill_leftovers(stored_run(group, started))
    psutil.wait_procs(left, timeout=5)
    assert not [p for p in psutil.process_iter() if _group(p.pid) == group]


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
