"""One live run per run directory: a second `nightshift run` on a live directory is refused
with a message naming the live run, before any engine loads; a run killed with SIGKILL does
not block its own resume."""

import json
import os
import signal
import time

from test_preemption import corpus, nightshift, run_args


def wait_for(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_a_second_run_on_a_live_directory_is_refused_and_a_killed_run_resumes(tmp_path):
    input_path, run_dir = corpus(tmp_path / "in.jsonl"), tmp_path / "run"
    first = nightshift(run_args(input_path, run_dir))
    try:
        wait_for(run_dir / "lease.json")
        lease = json.loads((run_dir / "lease.json").read_text())
        assert lease["pid"] == first.pid

        started = time.monotonic()
        second = nightshift(run_args(input_path, run_dir))
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 2, output[-2000:]
        assert f"is being run by pid {first.pid}" in output and lease["since"] in output
        assert time.monotonic() - started < 60  # refused before an engine or Prefect started
        assert first.poll() is None  # the live run goes on, untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a lost machine: no chance to release the lease
        first.wait()

    assert (run_dir / "lease.json").exists()  # left behind by the killed run
    resumed = nightshift(run_args(input_path, run_dir))
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    ids = [json.loads(line)["custom_id"] for line in (run_dir / "output.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 480
    assert not (run_dir / "lease.json").exists()  # released at the end
