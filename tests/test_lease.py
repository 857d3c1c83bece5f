"""One live run per run directory, on a bucket too. (On a local directory the SIGKILL drill in
test_preemption.py checks it: a second `nightshift run` on a live directory is refused, naming
the live run, before any engine loads; a run killed with SIGKILL does not block its resume.)"""

import os


def test_a_bucket_run_directory_has_one_live_run_too(s3_endpoint, monkeypatch):
    """The lease is an object like any other: a second process is refused on an `s3://` run
    directory held by a live run, and may take it once the holder has released it."""
    import subprocess
    import sys
    import uuid

    import s3fs
    from conftest import REPO

    from nightshift.runtime.lease import run_lease
    from nightshift.runtime.rundir import RunDir

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
        f"from nightshift.runtime.lease import run_lease\nfrom nightshift.runtime.rundir import RunDir\n"
        f"with run_lease(RunDir({run_dir!r})): print('took it')",
    ]

    with run_lease(RunDir(run_dir)):
        refused = subprocess.run(other_process, cwd=REPO, capture_output=True, text=True, env={**os.environ})
        assert refused.returncode != 0 and "RunDirectoryBusy" in refused.stderr
        assert f"is being run by pid {os.getpid()}" in refused.stderr
    taken = subprocess.run(other_process, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert taken.returncode == 0 and "took it" in taken.stdout, taken.stderr[-2000:]


def test_a_run_frozen_past_its_lease_and_taken_over_makes_nothing_visible_when_it_wakes(
    s3_endpoint, warm_engine, tmp_path
):
    """The paused owner: a bucket run stopped with SIGSTOP (a frozen VM) past the lease's TTL, a
    second run takes the directory over and completes it; the first, woken with SIGCONT, finds
    the lease another's at its next write and stops with exit status 2, having published
    nothing but what was in flight at the freeze — at most one chunk upload, and a progress.json
    write stamped with its own, older lease epoch, which the readers ignore (tests/nightshift/
    test_owner_fence.py); every row is in the outputs exactly once. Both runs reach the session's engine server
    (`--engine-url`): the subject is the directory's lease, not an engine inside the frozen run."""
    import io
    import signal
    import subprocess
    import time
    import uuid

    import orjson
    import pyarrow.parquet as pq
    import s3fs
    from conftest import chat_request
    from harness import run_cli, start_cli

    env = {
        "AWS_ACCESS_KEY_ID": "nightshift-test",
        "AWS_SECRET_ACCESS_KEY": "fence-test",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "NIGHTSHIFT_LEASE_TTL_S": "4",
    }
    fs = s3fs.S3FileSystem(key="nightshift-test", secret="fence-test", client_kwargs={"endpoint_url": s3_endpoint},
                           use_listings_cache=False)  # fmt: skip
    bucket = f"fence-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    ids = [f"req-{i:04d}" for i in range(96)]
    lines = [orjson.dumps(chat_request(i, f"Write about item {i}.", max_tokens=48, ignore_eos=True)) for i in ids]
    fs.pipe(f"{bucket}/in.jsonl", b"\n".join(lines) + b"\n")
    run = f"s3://{bucket}/runs/tonight"
    args = ["run", f"s3://{bucket}/in.jsonl", "--output", run, "--model", "tiny", "--shard-size", "40",
            "--chunk-size", "8", "--engine-url", warm_engine.url, "--engine-max-concurrency", "16",
            "--oracle-samples", "0"]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    first = start_cli(*args, env=env, cwd=tmp_path / "a", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not fs.glob(f"{bucket}/runs/tonight/shards/*/chunk-*.parquet"):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        time.sleep(6)  # past its TTL without a heartbeat
        second = run_cli(*args, env=env, cwd=tmp_path / "b")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "presumed dead" in second.stdout + second.stderr
        published = {key: fs.cat(key) for key in fs.find(bucket) if "/lease" not in key}  # not the lease's own
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=300)[0]

    assert first.returncode == 2, output[-3000:]
    assert "was taken over by" in output and "makes nothing more visible" in output, output[-3000:]
    now = {key: fs.cat(key) for key in fs.find(bucket) if "/lease" not in key}
    merged = [orjson.loads(line) for line in fs.cat(f"{bucket}/runs/tonight/output.jsonl").splitlines()]
    assert [line["custom_id"] for line in merged] == ids, "every row once, in input order"
    changed = {key for key in now.keys() | published.keys() if now.get(key) != published.get(key)}
    lease = orjson.loads(fs.cat(f"{bucket}/runs/tonight/lease.json"))
    progress = f"{bucket}/runs/tonight/progress.json"
    assert orjson.loads(published[progress])["epoch"] == lease["epoch"] == 2, "the new owner's progress"
    if progress in changed:  # its write was in flight at the freeze (past the fence's first check)
        assert orjson.loads(now[progress])["epoch"] == 1, "the late snapshot carries the taken-over run's epoch"
        changed.discard(progress)
    assert {key: now.get(key) for key in changed if "/chunk-" not in key} == {
        key: published.get(key) for key in changed if "/chunk-" not in key
    }, "the woken run made nothing visible: no manifest, output, report or progress of it"
    # …but a chunk upload already past its check when the VM froze (its body sent, the answer not
    # yet read) lands in the freeze or just after, and is taken back when the run wakes to the
    # lost lease: one whole chunk of finished rows, in or out, which the merge counts once either way.
    assert len(changed) <= 1, f"at most the one chunk in flight at the freeze: {sorted(changed)}"
    for key in changed:
        rows = pq.read_table(io.BytesIO(now.get(key) or published[key]), columns=["custom_id"]).column(0)
        assert set(rows.to_pylist()) <= set(ids), key
    let_go = orjson.loads(fs.cat(f"{bucket}/runs/tonight/lease-beats/{lease['token']}.json"))
    assert lease["epoch"] == 2 and let_go["released"]
