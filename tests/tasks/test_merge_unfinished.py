"""Specification of closing a run stopped before its end (a batch cancelled or out of its
window): finished rows are its output, every other planned row an error line with the given
code, a row the plan rejected keeps its own error — each row exactly once."""

import json

import pytest
from conftest import chat_request, read_jsonl, write_jsonl

from nightshift.jobs import make_job
from nightshift.runtime.rundir import RunDir
from nightshift.stages.chunks import ChunkWriter, shard_cache_key
from nightshift.stages.merge import merge_unfinished
from nightshift.stages.plan import plan
from nightshift.wire.lines import BatchLine

pytestmark = pytest.mark.fast


def test_unfinished_rows_become_error_lines_and_finished_ones_stay_outputs(tmp_path):
    rows = [chat_request(f"r{i}", f"text {i}") for i in range(7)]
    rows[4] = "{not json"
    run_dir = RunDir(tmp_path / "run")
    job = make_job("tiny")
    job.save(run_dir.job)
    planned = plan(str(write_jsonl(tmp_path / "in.jsonl", rows)), run_dir, shard_size=3)
    first = planned.shards[0]  # rows 0-2: 0 and 1 finished before the stop
    key = shard_cache_key(first, job)
    writer = ChunkWriter(run_dir.shard_output(key), first.index, chunk_size=100, cache_key=key, run_dir=run_dir)
    for index in (0, 1):
        writer._add(
            {"row_index": index, "custom_id": f"r{index}"},
            BatchLine.answered(f"r{index}", f"q{index}", {"choices": []}),
            ok=True, text="done", finish_reason="stop", prompt_tokens=3, completion_tokens=2,
            error_code=None, source="engine",
        )  # fmt: skip
    writer.flush()

    report = merge_unfinished(run_dir, "batch_expired", "out of time")

    assert [line["custom_id"] for line in read_jsonl(run_dir.output)] == ["r0", "r1"]
    errors = {line["custom_id"]: line["error"] for line in read_jsonl(run_dir.errors)}
    assert {cid: e["code"] for cid, e in errors.items() if cid} == {
        "r2": "batch_expired", "r3": "batch_expired", "r5": "batch_expired", "r6": "batch_expired"
    }  # fmt: skip
    assert [e["code"] for cid, e in errors.items() if not cid] == ["invalid_json"]  # the plan's own verdict
    assert errors["r5"]["line"] == 6
    assert (report.total_rows, report.succeeded, report.failed) == (7, 2, 5)
    # Closing again changes nothing: every row already has its outcome.
    again = merge_unfinished(run_dir, "batch_cancelled", "too late")
    assert again.errors_by_code == report.errors_by_code
    assert json.loads(run_dir.errors.read_text().splitlines()[0])["error"]["code"] == "batch_expired"
