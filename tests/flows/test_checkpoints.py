"""Specification of the checkpoint store: Prefect's task cache keyed on the shard hash.

A shard is regenerated exactly when its rows, the model, or a generation setting changed,
or when its checkpoint no longer matches the files on disk — never because code changed.
"""

import shutil
import subprocess

import pytest
from conftest import REPO, chat_request, read_jsonl, write_jsonl
from harness import run_cli


def batch(path, temperature=0.0):
    return write_jsonl(path, [chat_request(f"r{i}", f"Row {i}", temperature=temperature) for i in range(30)])


def run(path, run_dir, job):
    from nightshift.flows.run import run_job

    return run_job(str(path), str(run_dir), job, shard_size=10)


@pytest.fixture
def finished_run(tmp_path, prefect_server, tiny_job):
    path = batch(tmp_path / "in.jsonl")
    report = run(path, tmp_path / "run", tiny_job)
    assert report.complete and report.shards == 3 and report.shards_cached == 0
    return path, tmp_path / "run"


def shard_dirs(run_dir):
    return sorted((run_dir / "shards").glob("*"), key=lambda d: d.name)


def test_deleting_one_shards_output_reruns_only_that_shard(finished_run, tiny_job):
    path, run_dir = finished_run
    before = read_jsonl(run_dir / "output.jsonl")
    victim = shard_dirs(run_dir)[1]
    for chunk in victim.glob("chunk-*.parquet"):
        chunk.unlink()
    report = run(path, run_dir, tiny_job)
    assert report.complete and report.shards_cached == 2
    assert len(list(victim.glob("chunk-*.parquet"))) > 0
    after = read_jsonl(run_dir / "output.jsonl")
    assert [r["custom_id"] for r in after] == [r["custom_id"] for r in before]
    # greedy decoding: the regenerated shard says the same thing
    assert [r["response"]["body"]["choices"] for r in after] == [r["response"]["body"]["choices"] for r in before]


def test_a_corrupted_chunk_is_detected_and_its_shard_regenerated(finished_run, tiny_job):
    path, run_dir = finished_run
    chunk = next(shard_dirs(run_dir)[0].glob("chunk-*.parquet"))
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    report = run(path, run_dir, tiny_job)
    assert report.complete and report.shards_cached == 2
    assert len(read_jsonl(run_dir / "output.jsonl")) == 30


def test_changing_the_sampling_temperature_reruns_every_shard(finished_run, tiny_job, tmp_path):
    _, run_dir = finished_run
    report = run(batch(tmp_path / "warmer.jsonl", temperature=0.7), run_dir, tiny_job)
    assert report.complete and report.shards_cached == 0


def test_editing_the_task_source_reruns_no_shard(finished_run, tmp_path):
    path, run_dir = finished_run
    # The checkout, edited, laid out as pyproject installs it (tasks/ is nightshift/tasks/) and
    # first on the child's path, ahead of the editable install's mapping to this checkout.
    copy = tmp_path / "edited-install"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        top = name.split("/")[0]
        if top in ("nightshift", "flows", "tasks", "blocks") and name.endswith(".py"):
            installed = copy / name if top == "nightshift" else copy / "nightshift" / name
            installed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, installed)
    with open(copy / "nightshift" / "tasks" / "s3_generate.py", "a") as source:
        source.write("\nimport sys  # an edit that changes the task's source but not what it generates\n")
        source.write("sys.stderr.write('the edited s3_generate.py\\n')\n")
    from nightshift.models import cache_dir

    done = run_cli(
        "run", path, "--output", run_dir, "--model", "tiny", "--shard-size", "10", "--chunk-size", "4",
        cwd=copy, env={"NIGHTSHIFT_CACHE": str(cache_dir()), "PYTHONPATH": str(copy)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the edited s3_generate.py" in done.stderr, "the child ran the edited copy"
    assert "shards: 3 (3 from checkpoints)" in done.stdout


def test_changing_the_model_reruns_every_shard(finished_run, tmp_path):
    from nightshift.jobs import make_job
    from nightshift.models import model_dir

    path, run_dir = finished_run
    other = tmp_path / "tiny-copy"
    shutil.copytree(model_dir("tiny"), other)
    report = run(path, run_dir, make_job(str(other), chunk_size=4, max_num_seqs=16, served_model_name="tiny"))
    assert report.complete and report.shards_cached == 0
