"""A run given a deadline ends by it, on the real engine (tiny model) and a real Prefect
server: every row exactly once, in the outputs or as a retryable `batch_expired` error."""

import json
import threading
import time

from conftest import chat_request, read_jsonl, write_jsonl
from harness import run_cli

ROWS = 120


def long_rows(count: int) -> list[dict]:
    return [chat_request(f"row-{i:03d}", f"Tell a long story number {i}", max_tokens=64) for i in range(count)]


def test_a_deadline_mid_run_merges_the_finished_rows_and_expires_the_rest(tmp_path, prefect_server, tiny_job):
    from prefect.client.orchestration import get_client

    from nightshift.flows.run import run_job
    from nightshift.runtime.deadline import deadline_reached

    path = write_jsonl(tmp_path / "in.jsonl", long_rows(ROWS))
    run_dir = tmp_path / "run"

    def deadline_once_rows_land():  # the deadline falls while the engine is mid-run
        while not list(run_dir.glob("shards/*/chunk-*.parquet")):
            time.sleep(0.05)
        deadline_reached.set()

    threading.Thread(target=deadline_once_rows_land, daemon=True).start()
    job = tiny_job.model_copy(update={"chunk_size": 4})
    report = run_job(str(path), str(run_dir), job, shard_size=30, deadline="2h")

    assert report.expired and report.complete
    done = {line["custom_id"] for line in read_jsonl(run_dir / "output.jsonl")}
    expired = read_jsonl(run_dir / "errors.jsonl")
    assert all(line["error"]["code"] == "batch_expired" for line in expired)
    expired_ids = {line["custom_id"] for line in expired}
    assert done and expired_ids, "the deadline fell mid-run: some rows finished, some did not"
    assert not done & expired_ids and done | expired_ids == {f"row-{i:03d}" for i in range(ROWS)}
    assert len(expired) == len(expired_ids) == report.errors_by_code["batch_expired"]
    assert "deadline" in expired[0]["error"]["message"]

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=5, sort="START_TIME_DESC")
    last = next(r for r in runs if r.flow_id and r.state and r.state.name == "Expired")
    assert last.state.is_completed() and f"{len(done)} of {ROWS} rows done" in last.state.message

    from nightshift.flows.retry import retry_errors

    retried = retry_errors(str(run_dir))  # expired rows are retryable; finished ones are kept
    assert retried.succeeded == ROWS and not retried.failed
    assert len(read_jsonl(run_dir / "output.jsonl")) == ROWS
    assert json.loads((run_dir / "run.json").read_text())["succeeded"] == ROWS


def test_a_deadline_already_past_generates_nothing_and_exits_4(tmp_path, capsys):
    from nightshift.cli import main  # in this process: the session's engine configuration, nothing reloaded

    path = write_jsonl(tmp_path / "in.jsonl", long_rows(20) + ["{broken json"])
    run_dir = tmp_path / "run"
    code = main(["run", str(path), "--output", str(run_dir), "--model", "tiny", "--max-num-seqs", "16",
                 "--deadline", "2020-01-01T00:00Z", "--shard-size", "8"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 4, out.out + out.err
    assert "deadline reached: 20 rows not generated" in out.out
    errors = read_jsonl(run_dir / "errors.jsonl")
    codes = sorted(line["error"]["code"] for line in errors)
    assert codes == ["batch_expired"] * 20 + ["invalid_json"]  # a row the plan rejected keeps its own error
    assert len(errors) == 21 and not (run_dir / "output.jsonl").read_text()


def test_a_deadline_nobody_can_read_is_refused_before_any_work(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", long_rows(2))
    started = time.monotonic()
    done = run_cli("run", path, "--output", tmp_path / "run", "--model", "tiny", "--deadline", "tomorrow morning",
                   timeout=120)  # fmt: skip
    assert done.returncode == 2 and "deadline 'tomorrow morning'" in done.stderr
    # no run directory: refused before any work (the bound only says it did not wait for an engine)
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()
