"""A run directory on a bucket: `nightshift run s3://…/in.jsonl --output s3://…/run` against a
real S3-compatible server (moto's), credentials from the environment as on a cloud machine.

Killed with SIGKILL mid-run and started again from another, empty working directory, the run
resumes from the bucket alone: finished shards come back from checkpoints, every row ends in
the outputs exactly once, no half-written object is left, and the secret key is in no object
and no line of output.
"""

import os
import re
import signal
import subprocess
import time
import uuid

import pytest
from conftest import chat_request
from harness import REPO, start_cli

ROWS = 240
SHARD = 30


@pytest.fixture
def bucket(s3_endpoint):
    import s3fs

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AWS_ACCESS_KEY_ID": "nightshift-test",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    fs = s3fs.S3FileSystem(
        key="nightshift-test", secret=secret, client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False
    )
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return fs, name, env, secret


def nightshift(args, env, cwd):
    return start_cli(
        *args,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_bucket_run_killed_mid_way_resumes_from_the_bucket_with_every_row_once(bucket, warm_engine, tmp_path):
    """The runs reach the session's engine server (`--engine-url`): the subject is the bucket's
    resume, not an engine inside the killed process."""
    import orjson

    fs, name, env, secret = bucket
    ids = [f"req-{i:04d}" for i in range(ROWS)]
    lines = [orjson.dumps(chat_request(i, f"Write about item {i}.", max_tokens=48, ignore_eos=True)) for i in ids]
    fs.pipe(f"{name}/in.jsonl", b"\n".join(lines) + b"\n")
    run = f"s3://{name}/runs/tonight"
    args = ["run", f"s3://{name}/in.jsonl", "--output", run, "--model", "tiny", "--engine-url", warm_engine.url]
    args += ["--shard-size", str(SHARD), "--chunk-size", "16", "--engine-max-concurrency", "32"]
    first_dir, second_dir = tmp_path / "machine-a", tmp_path / "machine-b"
    first_dir.mkdir()
    second_dir.mkdir()

    first = nightshift(args, env, first_dir)
    deadline = time.monotonic() + 400
    while not fs.find(f"{name}/runs/tonight/checkpoints"):  # a shard finished and checkpointed
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first_output = first.communicate()[0]
    assert not fs.exists(f"{name}/runs/tonight/output.jsonl"), "killed after the merge: nothing was tested"

    second = nightshift(args, env, second_dir)
    second_output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, second_output[-3000:]
    shards, resumed = map(int, re.search(r"shards: (\d+) \((\d+) from checkpoints\)", second_output).groups())
    assert shards == ROWS // SHARD and 1 <= resumed < shards, second_output[-2000:]

    merged = [orjson.loads(line) for line in fs.cat(f"{name}/runs/tonight/output.jsonl").splitlines()]
    assert [line["custom_id"] for line in merged] == ids  # every row, once, in input order
    assert fs.cat(f"{name}/runs/tonight/errors.jsonl") == b""
    assert list(tmp_path.rglob("*")) == [first_dir, second_dir], "the working directories stay empty"

    objects = fs.find(name)
    assert not [o for o in objects if ".tmp" in o], "no half-written object"
    for key in objects:
        assert secret.encode() not in fs.cat(key), key
    assert secret not in first_output + second_output


def test_a_bucket_run_survives_throttling_server_errors_stalls_and_dropped_connections(bucket, monkeypatch):
    """In this process, on the session's engine: the faults are the storage layer's subject, and
    every read and write of the run (lease, plan, chunks, manifests, merge, canaries) meets them.
    Chunks of 10 rows: a few hundred requests, each of them at risk, and not a thousand stalls."""
    import orjson
    from fault_proxy import FaultyS3Proxy

    from nightshift.flows.run import run_job
    from nightshift.jobs import make_job
    from nightshift.runtime import storage

    tiny_job = make_job("tiny", chunk_size=10, max_num_seqs=16)

    fs, name, env, secret = bucket
    ids = [f"req-{i:04d}" for i in range(120)]
    fs.pipe(f"{name}/in.jsonl", b"\n".join(orjson.dumps(chat_request(i, f"Say {i}.")) for i in ids) + b"\n")
    monkeypatch.setattr(storage, "_options", {})  # the proxy's endpoint is this test's alone

    with FaultyS3Proxy(env["AWS_ENDPOINT_URL"], fault_rate=0.1, stall_s=1.0) as proxy:
        storage.use_storage_options(
            {"key": "nightshift-test", "secret": secret, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        )
        report = run_job(f"s3://{name}/in.jsonl", f"s3://{name}/runs/faulty", tiny_job, shard_size=30)

    assert report.succeeded == len(ids) and report.failed == 0
    faults = {kind: n for kind, n in proxy.counts.items() if kind != "ok"}
    assert sum(faults.values()) >= 10, proxy.counts  # the faults happened, and were survived
    merged = [orjson.loads(line) for line in fs.cat(f"{name}/runs/faulty/output.jsonl").splitlines()]
    assert [line["custom_id"] for line in merged] == ids
    assert not [o for o in fs.find(f"{name}/runs/faulty") if ".tmp" in o]
    print("S3 requests through the proxy:", dict(proxy.counts))
