"""Specification of engine-fault handling: the real engine process is killed mid-shard.

The shard is retried on a fresh engine and finishes with no row lost or repeated; a row
under which the engine dies twice is set aside as an `engine_error`, and `nightshift retry`
gives it another chance.
"""

import threading
import time

import pytest
from conftest import chat_request, read_jsonl, write_jsonl


def test_killing_the_engine_mid_shard_retries_the_shard_and_loses_nothing(
    tmp_path, prefect_server, tiny_job, engine_in_its_own_processes
):
    from nightshift.engine.local import _kill_engine_processes
    from nightshift.flows.run import run_job

    path = write_jsonl(tmp_path / "in.jsonl", [chat_request(f"r{i}", f"Row {i}", max_tokens=40) for i in range(120)])
    run_dir = tmp_path / "run"
    killed = threading.Event()

    def kill_once_chunks_appear():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(run_dir.glob("shards/*/chunk-*.parquet")):
            time.sleep(0.05)
        _kill_engine_processes()
        killed.set()

    threading.Thread(target=kill_once_chunks_appear, daemon=True).start()
    report = run_job(str(path), str(run_dir), tiny_job, shard_size=60)
    assert killed.is_set()
    assert report.complete and report.failed == 0
    assert [row["custom_id"] for row in read_jsonl(run_dir / "output.jsonl")] == [f"r{i}" for i in range(120)]


@pytest.mark.drill
def test_a_row_that_kills_the_engine_twice_is_set_aside_then_retried(
    tmp_path, prefect_server, tiny_job, engine_in_its_own_processes, monkeypatch
):
    """A drill (`make drills`): the engine's processes killed twice, three engines started (about
    120 s in the suite). The suite proves the rule faster on the real stage, chunks and merge:
    tests/tasks/test_generate_suspects.py."""
    from nightshift.engine.local import shutdown_engine
    from nightshift.flows.retry import retry_errors
    from nightshift.flows.run import run_job

    monkeypatch.setenv("NIGHTSHIFT_CHAOS_KILL_ENGINE_ON", "poison")
    rows = [chat_request(f"r{i}", f"Row {i}") for i in range(20)]
    rows.insert(9, chat_request("poison", "this row crashes the engine"))
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_dir = tmp_path / "run"

    report = run_job(str(path), str(run_dir), tiny_job, shard_size=100)
    assert report.complete and report.succeeded == 20 and report.errors_by_code == {"engine_error": 1}
    (error,) = read_jsonl(run_dir / "errors.jsonl")
    assert error["custom_id"] == "poison" and error["error"]["line"] == 10

    monkeypatch.delenv("NIGHTSHIFT_CHAOS_KILL_ENGINE_ON")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no process dies from here on: the suite's faster layout
    shutdown_engine()
    report = retry_errors(str(run_dir))
    assert report.complete and report.failed == 0
    assert read_jsonl(run_dir / "errors.jsonl") == []
    ids = [row["custom_id"] for row in read_jsonl(run_dir / "output.jsonl")]
    assert ids == [f"r{i}" for i in range(9)] + ["poison"] + [f"r{i}" for i in range(9, 20)]
