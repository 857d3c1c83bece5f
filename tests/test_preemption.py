"""Kill the real CLI process mid-run — SIGKILL and SIGTERM — and resume it.

Whatever is killed when, every input row ends up exactly once in the outputs, finished work
is not redone, and the on-disk state is consistent at every moment.
"""

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
from conftest import read_jsonl, write_jsonl
from harness import VLLM_OWN_PROCESSES, kill_what_it_left, start_cli

ROWS = 240
SHARD = 80


def corpus(path: Path) -> Path:
    rows = [
        {"id": f"doc-{i:04d}", "text": f"Document {i}: the quarterly invoice of client {i % 17} is overdue."}
        for i in range(ROWS)
    ]
    return write_jsonl(path, rows)


def nightshift(args, env: dict[str, str] | None = None):
    return start_cli(
        *args,
        env={"NIGHTSHIFT_SIGTERM_GRACE_S": "5", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the kill takes the engine's processes too
    )


def run_args(input_path, run_dir, engine_url: str | None = None):
    """The run's arguments: its own engine, or the engine server at `engine_url`, as many rows in
    flight there as the local engine decodes together."""
    engine = ["--engine-url", engine_url, "--engine-max-concurrency", "8"] if engine_url else ["--max-num-seqs", "8"]
    return [
        "run",
        str(input_path),
        "--output",
        str(run_dir),
        "--model",
        "tiny",
        "--id-column",
        "id",
        "--text-column",
        "text",
        "--max-tokens",
        "48",
        "--shard-size",
        str(SHARD),
        "--chunk-size",
        "16",
        *engine,
    ]


def chunk_rows(run_dir: Path) -> dict[str, list[int]]:
    """row_index values on disk, per shard output directory; every chunk file must be readable."""
    found = {}
    for directory in sorted((run_dir / "shards").glob("*")):
        files = sorted(directory.glob("chunk-*.parquet"))
        found[directory.name] = pq.read_table(files, columns=["row_index"])["row_index"].to_pylist() if files else []
    return found


def wait_for_chunks(run_dir: Path, at_least: int, process, timeout=400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for _ in run_dir.glob("shards/*/chunk-*.parquet")) >= at_least:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no chunk files appeared")


def assert_complete_exactly_once(run_dir: Path):
    outputs = read_jsonl(run_dir / "output.jsonl")
    errors = read_jsonl(run_dir / "errors.jsonl")
    ids = [row["custom_id"] for row in outputs + errors]
    assert sorted(ids) == [f"doc-{i:04d}" for i in range(ROWS)]
    assert [row["custom_id"] for row in outputs] == sorted(row["custom_id"] for row in outputs)


def finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def test_sigkill_at_a_random_moment_then_rerun_loses_and_repeats_nothing_and_the_rerun_alone_holds_the_directory(
    tmp_path, warm_engine
):
    """The runs reach the test worker's engine server: the subject is the run directory after a
    kill — its chunks, checkpoints and lease — not an engine inside the killed process (an engine
    killed mid-shard: tests/flows/test_engine_faults.py; runs killed with their engines: the kill
    drill, tests/test_drill_kill.py)."""
    source, run_dir = corpus(tmp_path / "in.jsonl"), tmp_path / "run"
    first = nightshift(run_args(source, run_dir, warm_engine.url))
    wait_for_chunks(run_dir, at_least=3, process=first)
    time.sleep(random.uniform(0, 4))
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group: the CLI and whatever it started
    first.wait()

    on_disk = chunk_rows(run_dir)
    finished = {d.name for d in (run_dir / "shards").glob("*") if (d / "result.json").exists()}
    for rows in on_disk.values():
        assert len(rows) == len(set(rows))  # no row twice, even inside a killed shard
    mtimes = {f: f.stat().st_mtime_ns for f in run_dir.glob("shards/*/chunk-*.parquet")}

    killed_lease = json.loads((run_dir / "lease.json").read_text())
    assert not killed_lease["released"]  # left behind: a lost machine releases nothing
    args = run_args(source, run_dir, warm_engine.url)
    rerun = nightshift(args)
    assert_a_second_run_is_refused_while(rerun, run_dir, args)
    code, out = finish(rerun)
    assert code == 0, out[-3000:]
    assert_complete_exactly_once(run_dir)
    rerun_lease = json.loads((run_dir / "lease.json").read_text())
    let_go = json.loads((run_dir / "lease-beats" / f"{rerun_lease['token']}.json").read_text())
    assert let_go["released"] and rerun_lease["epoch"] == killed_lease["epoch"] + 1, "released at the end"
    # A shard killed between its result file and its task-cache record runs its task again and finds
    # every row on disk (its chunks untouched, below): checkpointed, though not through the cache.
    checkpointed = int(re.search(r"\((\d+) from checkpoints\)", out).group(1))
    assert checkpointed <= len(finished), out[-2000:]
    for directory in (run_dir / "shards").glob("*"):
        result = json.loads((directory / "result.json").read_text())
        if directory.name in finished:
            continue
        # only the rows missing on disk went through the engine again
        assert result["regenerated_rows"] == SHARD - len(on_disk.get(directory.name, []))
    for path, mtime in mtimes.items():  # finished chunks are kept, never rewritten
        assert path.stat().st_mtime_ns == mtime


def assert_a_second_run_is_refused_while(live, run_dir: Path, args: list[str]) -> None:
    """One live run per run directory: once `live` holds the lease (the killed run's lease does
    not stop it), a second run is refused, naming it, before any engine or Prefect starts."""
    deadline = time.monotonic() + 120
    while _lease_holder(run_dir) != live.pid:
        assert time.monotonic() < deadline and live.poll() is None, "the resumed run never took the lease"
        time.sleep(0.2)
    since = json.loads((run_dir / "lease.json").read_text())["since"]
    started = time.monotonic()
    second = nightshift(args)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 2, output[-2000:]
    assert f"is being run by pid {live.pid}" in output and since in output
    assert time.monotonic() - started < 60


def _lease_holder(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "lease.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigterm_stops_within_the_grace_period_consistent_and_resumable(tmp_path):
    source, run_dir = corpus(tmp_path / "in.jsonl"), tmp_path / "run"
    first = nightshift(run_args(source, run_dir), env=VLLM_OWN_PROCESSES)  # the stop takes vLLM's processes down too
    wait_for_chunks(run_dir, at_least=2, process=first)
    sent = time.monotonic()
    first.send_signal(signal.SIGTERM)
    code = first.wait(timeout=60)
    stopped_after = time.monotonic() - sent
    kill_what_it_left(first)  # anything left in the group would hold stdout open
    out = first.stdout.read()
    assert code == 143, out[-3000:]
    assert stopped_after < 5 + 15  # grace + flush and shutdown
    assert "re-run the same command to resume" in out
    for rows in chunk_rows(run_dir).values():
        assert len(rows) == len(set(rows))
    assert not (run_dir / "output.jsonl").exists()  # no merged output from a partial run

    code, out = finish(nightshift(run_args(source, run_dir)))  # the resume's subject is the directory
    assert code == 0, out[-3000:]
    assert_complete_exactly_once(run_dir)
