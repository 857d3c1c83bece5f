"""Specification of the merge stage: every planned row ends in output.jsonl or errors.jsonl exactly
once, in input order, whatever order its chunks landed in; a run whose chunks lose or repeat a
row changes no output at all."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, read_jsonl, write_jsonl

from nightshift.jobs import make_job
from nightshift.records import ShardResult
from nightshift.runtime.rundir import RunDir
from nightshift.stages.chunks import ChunkWriter, shard_cache_key
from nightshift.stages.merge import IncompleteRun, merge
from nightshift.stages.plan import plan
from nightshift.wire.lines import BatchLine

pytestmark = pytest.mark.fast


@pytest.fixture
def planned(tmp_path):
    """Ten rows in shards of four (4 + 4 + 2), and the job that generates them."""
    run_dir = RunDir(tmp_path / "run")
    job = make_job("tiny")
    job.save(run_dir.job)
    rows = [chat_request(f"r{i}", f"text {i}") for i in range(10)]
    return run_dir, job, plan(str(write_jsonl(tmp_path / "in.jsonl", rows)), run_dir, shard_size=4)


def finish(run_dir, job, shard, outcomes: dict[int, str]) -> None:
    """One chunk file in `shard`'s directory: row index → "ok" or an error code."""
    key = shard_cache_key(shard, job)
    writer = ChunkWriter(run_dir.shard_output(key), shard.index, chunk_size=100, cache_key=key, run_dir=run_dir)
    for index, outcome in outcomes.items():
        row = {"row_index": index, "custom_id": f"r{index}", "line_no": index + 1}
        if outcome == "ok":
            writer._add(
                row, BatchLine.answered(f"r{index}", f"q{index}", {"choices": []}),
                ok=True, text=f"answer {index}", finish_reason="stop", prompt_tokens=3, completion_tokens=2,
                error_code=None, source="engine",
            )  # fmt: skip
        else:
            writer.add_error(row, {"code": outcome, "message": "failed", "line": index + 1})
    writer.flush()


def results(run_dir, job, planned_run) -> list[ShardResult]:
    return [
        ShardResult(
            shard_index=s.index,
            cache_key=shard_cache_key(s, job),
            output_dir=str(run_dir.shard_output(shard_cache_key(s, job))),
            chunk_files=[],
            chunk_sha256=[],
            rows=s.num_rows,
            succeeded=0,
            failed=0,
            prompt_tokens=0,
            completion_tokens=0,
            regenerated_rows=0,
            wall_seconds=0,
        )
        for s in reversed(planned_run.shards)  # the order results come back in is not the input's
    ]


def test_rows_come_out_in_input_order_and_a_retried_row_keeps_its_success(planned):
    run_dir, job, planned_run = planned
    first, second, third = planned_run.shards
    finish(run_dir, job, third, {9: "ok", 8: "ok"})
    finish(run_dir, job, first, {3: "ok", 1: "engine_error", 0: "ok"})
    finish(run_dir, job, first, {2: "ok"})
    finish(run_dir, job, first, {1: "ok"})  # `nightshift retry` succeeded where the engine had failed
    finish(run_dir, job, second, {7: "ok", 6: "invalid_request", 5: "ok", 4: "ok"})

    report = merge(planned_run, results(run_dir, job, planned_run), run_dir)

    assert [line["custom_id"] for line in read_jsonl(run_dir.output)] == [f"r{i}" for i in range(10) if i != 6]
    assert [(line["custom_id"], line["error"]["code"]) for line in read_jsonl(run_dir.errors)] == [
        ("r6", "invalid_request")
    ]
    table = pq.read_table(run_dir.results).to_pydict()
    assert table["custom_id"] == [f"r{i}" for i in range(10)]
    assert table["text"][1] == "answer 1" and table["finish_reason"][6] is None
    assert (report.total_rows, report.succeeded, report.failed) == (10, 9, 1)
    assert (report.prompt_tokens, report.completion_tokens) == (27, 18)
    assert report.errors_by_code == {"invalid_request": 1}
    assert json.loads(run_dir.summary.read_text())["succeeded"] == 9


def test_a_missing_row_changes_no_output(planned):
    run_dir, job, planned_run = planned
    first, second, third = planned_run.shards
    finish(run_dir, job, first, dict.fromkeys(range(4), "ok"))
    finish(run_dir, job, second, dict.fromkeys(range(4, 8), "ok"))
    finish(run_dir, job, third, {8: "ok", 9: "ok"})
    merge(planned_run, results(run_dir, job, planned_run), run_dir)
    before = {path: path.read_bytes() for path in (run_dir.output, run_dir.errors, run_dir.results)}
    for chunk in run_dir.shard_output(shard_cache_key(third, job)).glob("chunk-*.parquet"):
        chunk.unlink()
    finish(run_dir, job, third, {8: "ok"})  # row 9 lost

    with pytest.raises(IncompleteRun, match=r"shard 2 planned rows 8\.\.9 \(2\) but its chunks hold 1 rows"):
        merge(planned_run, results(run_dir, job, planned_run), run_dir)
    assert {path: path.read_bytes() for path in before} == before
    assert not list(run_dir.root.glob("*.tmp-*"))


def test_a_row_in_another_shards_chunks_is_refused(planned):
    run_dir, job, planned_run = planned
    first, second, third = planned_run.shards
    finish(run_dir, job, first, dict.fromkeys(range(4), "ok"))
    finish(run_dir, job, second, dict.fromkeys(range(3, 7), "ok"))  # row 3 twice, row 7 nowhere
    finish(run_dir, job, third, {8: "ok", 9: "ok"})

    with pytest.raises(IncompleteRun, match=r"shard 1 planned rows 4\.\.7 \(4\) but its chunks hold 4 rows \(3\.\.6\)"):
        merge(planned_run, results(run_dir, job, planned_run), run_dir)
    assert not run_dir.output.exists()


def test_a_shard_with_nothing_generated_is_refused(planned):
    run_dir, job, planned_run = planned
    first, second, _ = planned_run.shards
    finish(run_dir, job, first, dict.fromkeys(range(4), "ok"))
    finish(run_dir, job, second, dict.fromkeys(range(4, 8), "ok"))

    with pytest.raises(IncompleteRun, match="shard 2 has no generated rows"):
        merge(planned_run, results(run_dir, job, planned_run), run_dir)


@pytest.fixture
def regrouped(tmp_path):
    """120 rows, a document's questions scattered over the input: shards of whole documents."""
    run_dir = RunDir(tmp_path / "run")
    job = make_job("tiny")
    job.save(run_dir.job)
    rows = [chat_request(f"r{i}", f"Document {i % 12}: " + f"paragraph {i % 12} " * 120 + f"Q{i}?") for i in range(120)]
    planned_run = plan(str(write_jsonl(tmp_path / "in.jsonl", rows)), run_dir, shard_size=25)
    assert planned_run.layout == "prefix-groups"
    return run_dir, job, planned_run


def rows_of(shard) -> list[int]:
    return pq.read_table(shard.path)["row_index"].to_pylist()


def test_regrouped_shards_merge_back_into_input_order(regrouped):
    run_dir, job, planned_run = regrouped
    for shard in planned_run.shards:
        finish(run_dir, job, shard, dict.fromkeys(rows_of(shard), "ok"))

    report = merge(planned_run, results(run_dir, job, planned_run), run_dir)

    assert [line["custom_id"] for line in read_jsonl(run_dir.output)] == [f"r{i}" for i in range(120)]
    assert pq.read_table(run_dir.results)["custom_id"].to_pylist() == [f"r{i}" for i in range(120)]
    assert (report.total_rows, report.succeeded) == (120, 120)


def test_a_row_of_a_regrouped_shard_in_another_shards_chunks_is_refused(regrouped):
    run_dir, job, planned_run = regrouped
    first, second, *rest = planned_run.shards
    stolen = rows_of(second)[0]
    finish(run_dir, job, first, dict.fromkeys(rows_of(first)[1:] + [stolen], "ok"))  # its own first row lost
    for shard in [second, *rest]:
        finish(run_dir, job, shard, dict.fromkeys(rows_of(shard), "ok"))

    with pytest.raises(
        IncompleteRun, match=r"the plan holds rows 0\.\.119 but the shards' chunks hold 120 rows, 119 distinct"
    ):
        merge(planned_run, results(run_dir, job, planned_run), run_dir)
    assert not run_dir.output.exists()
