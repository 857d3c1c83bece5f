"""A model kept on the bucket (`--model s3://…/model-dir`): fetched once per machine into the
local cache, used by the engine, identified the same way on every worker, and refused once its
weights change on the bucket under a job made with the old ones."""

import os
import uuid

import pytest
from conftest import chat_request, read_jsonl, write_jsonl
from harness import REPO, run_cli


@pytest.fixture
def model_on_bucket(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    from nightshift.models import model_dir

    credentials = {
        "AWS_ACCESS_KEY_ID": "nightshift-test",
        "AWS_SECRET_ACCESS_KEY": f"s3cr3t-{uuid.uuid4().hex}",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(str(model_dir("tiny")), f"{bucket}/tiny", recursive=True)
    return fs, f"s3://{bucket}/tiny", {**os.environ, **credentials}


def test_a_model_on_the_bucket_is_fetched_once_and_runs(model_on_bucket, tmp_path, monkeypatch):
    fs, url, env = model_on_bucket
    requests = write_jsonl(tmp_path / "in.jsonl", [chat_request(f"r{i}", f"Say {i}.") for i in range(6)])
    cache = tmp_path / "worker-cache"
    command = ["run", requests, "--model", url]
    env = {**env, "NIGHTSHIFT_CACHE": str(cache), "PYTHONPATH": str(REPO)}

    first = run_cli(*command, "--output", tmp_path / "one", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line["custom_id"] for line in read_jsonl(tmp_path / "one" / "output.jsonl")] == [f"r{i}" for i in range(6)]
    [fetched] = (cache / "models" / "remote").iterdir()
    assert (fetched / "config.json").exists() and (fetched / ".nightshift-identity").exists()
    mtime = (fetched / "config.json").stat().st_mtime_ns

    # The next run on this machine resolves the model as the first did, and finds it fetched.
    from nightshift.jobs import make_job
    from nightshift.models import local_model

    monkeypatch.setenv("NIGHTSHIFT_CACHE", str(cache))
    assert local_model(url, make_job(url).model_identity) == str(fetched)
    assert (fetched / "config.json").stat().st_mtime_ns == mtime, "the next run reuses the fetched copy"


def test_an_s3_models_identity_is_the_same_everywhere_and_changes_with_its_weights(
    model_on_bucket, tmp_path, monkeypatch
):
    from nightshift.errors import ConfigurationError
    from nightshift.jobs import make_job
    from nightshift.models import local_model

    fs, url, _ = model_on_bucket
    job = make_job(url)
    assert job.engine.model == url and job.served_model_name == "tiny"
    assert str(REPO) not in job.model_dump_json(), "no local path in what every worker must agree on"
    assert make_job(url).fingerprint() == job.fingerprint()

    fs.pipe(url.removeprefix("s3://") + "/config.json", fs.cat(url.removeprefix("s3://") + "/config.json") + b"\n")
    assert make_job(url).model_identity != job.model_identity
    monkeypatch.setenv("NIGHTSHIFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigurationError, match="changed on the object store"):
        local_model(url, job.model_identity)
