"""One live run per run directory: a second `nightshift run` on a live directory is refused
with a message naming the live run, before any engine loads; a run killed with SIGKILL does
not block its own resume."""

import json
import os
import signal
import time

from test_preemption import ROWS, corpus, nightshift, run_args


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
    assert len(ids) == len(set(ids)) == ROWS
    assert not (run_dir / "lease.json").exists()  # released at the end


def test_a_bucket_run_directory_has_one_live_run_too(s3_endpoint, monkeypatch):
    """The lease is an object like any other: a second process is refused on an `s3://` run
    directory held by a live run, and may take it once the holder has released it."""
    import subprocess
    import sys
    import uuid

    import s3fs
    from conftest import REPO

    from nightshift.lease import run_lease

    credentials = {
        "AWS_ACCESS_KEY_ID": "nightshift-test",
        "AWS_SECRET_ACCESS_KEY": "lease-test",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    run_dir = f"s3://{bucket}/runs/tonight"
    other_process = [
        sys.executable,
        "-c",
        f"from nightshift.lease import run_lease\nwith run_lease({run_dir!r}): print('took it')",
    ]

    with run_lease(run_dir):
        refused = subprocess.run(other_process, cwd=REPO, capture_output=True, text=True, env={**os.environ})
        assert refused.returncode != 0 and "RunDirectoryBusy" in refused.stderr
        assert f"is being run by pid {os.getpid()}" in refused.stderr
    taken = subprocess.run(other_process, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert taken.returncode == 0 and "took it" in taken.stdout, taken.stderr[-2000:]
