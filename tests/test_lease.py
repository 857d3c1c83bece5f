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
