"""Merge stage: the shards' chunk files become the run's outputs, in input order.

Plain SQL over the chunk Parquet files (DuckDB streams them; nothing is held whole):

* ``output.jsonl``  — OpenAI Batch output lines of the rows that succeeded
* ``errors.jsonl``  — OpenAI-style error lines of the rows that failed
* ``results.parquet`` — custom_id, text, finish_reason, prompt_tokens, completion_tokens, shard
* ``embeddings.parquet`` — an embedded corpus: id, embedding (fixed-size list of float32),
  tokens, in input order; read as-is by DuckDB, pyarrow and pandas

Each row's best outcome is taken (see nightshift/chunks.py); before writing, merge proves
that every planned row has one. Each output is written whole (a local temporary, then one
rename or one upload to the bucket), so a reader never sees a half-merged run.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from prefect import task

from nightshift.canaries import CANARY_PREFIX
from nightshift.chunks import ChunkWriter, best_rows_sql, chunk_files, rows_on_disk, shard_cache_key
from nightshift.config import JobSpec
from nightshift.deadline import EXPIRED_CODE
from nightshift.records import Plan, RunReport, ShardResult
from nightshift.rundir import RunDir
from nightshift.storage import duckdb_connection, read_table, sql_path, written_whole


class IncompleteRun(RuntimeError):
    """Some planned row is missing from, or repeated in, the generated chunks."""


def merge(plan: Plan, results: list[ShardResult], run_dir: RunDir) -> RunReport:
    return _merge_directories(plan, [result.output_dir for result in results], run_dir)


def merge_unfinished(run_dir: RunDir, code: str, message: str) -> RunReport:
    """Close a run stopped before its end (a batch cancelled, or out of its completion window).

    Every planned row without an outcome gets an error line with `code` (OpenAI's
    `batch_expired`, say), written as a chunk of its own shard; then the run merges as usual:
    each row ends in the outputs or the errors, exactly once. The run's process must be gone.
    """
    plan, job = Plan.load(run_dir.plan_manifest), JobSpec.load(run_dir.job)
    directories = []
    for shard in plan.shards:
        key = shard_cache_key(shard, job)
        directory = run_dir.shard_output(key)
        finished = rows_on_disk(directory)
        rows = read_table(shard.path, columns=["row_index", "line_no", "custom_id", "error"]).to_pylist()
        writer = ChunkWriter(directory, shard.index, chunk_size=len(rows) + 1, cache_key=key, run_dir=run_dir)
        for row in rows:
            if row["row_index"] in finished:
                continue
            # A row the plan already rejected keeps its own error: it would never have run.
            error = json.loads(row["error"]) if row["error"] else {"code": code, "message": message}
            writer.add_error(row, {**error, "line": row["line_no"]})
        writer.flush()
        directories.append(directory)
    return _merge_directories(plan, directories, run_dir)


def _merge_directories(plan: Plan, directories: list, run_dir: RunDir) -> RunReport:
    # Every chunk in the shards' directories: `nightshift retry` may have added some since.
    files = [f for directory in directories for f in chunk_files(directory)]
    with duckdb_connection() as con:
        return _merge(con, plan, files, run_dir)


def _merge(con: duckdb.DuckDBPyConnection, plan: Plan, files: list[str], run_dir: RunDir) -> RunReport:
    con.execute(f"CREATE VIEW all_rows AS {best_rows_sql(files)}")
    rows, distinct = con.sql("SELECT count(*), count(DISTINCT row_index) FROM all_rows").fetchall()[0]
    if rows != plan.total_rows or distinct != plan.total_rows:
        raise IncompleteRun(
            f"{plan.total_rows} rows planned but the chunks hold {rows} rows "
            f"({distinct} distinct): refusing to write outputs that lose or repeat rows"
        )
    # Canary rows rode along for validation; they are not the user's rows.
    canary = f"starts_with(coalesce(custom_id, ''), '{CANARY_PREFIX}')"
    con.execute(f"CREATE VIEW chunk_rows AS SELECT * FROM all_rows WHERE NOT {canary}")
    if plan.canary_rows:
        _copy_parquet(con, f"SELECT * FROM all_rows WHERE {canary} ORDER BY row_index", run_dir.canary_results)
    rows, succeeded, prompt_tokens, completion_tokens = con.sql(
        """
        SELECT count(*), count(*) FILTER (WHERE ok),
               coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
        FROM chunk_rows
        """
    ).fetchall()[0]
    _write_lines(con, "SELECT line FROM chunk_rows WHERE ok AND line IS NOT NULL ORDER BY row_index", run_dir.output)
    embedded = _write_embeddings(con, run_dir.embeddings)
    _write_lines(con, "SELECT line FROM chunk_rows WHERE NOT ok ORDER BY row_index", run_dir.errors)
    _copy_parquet(
        con,
        "SELECT custom_id, text, finish_reason, prompt_tokens, completion_tokens, shard, source "
        "FROM chunk_rows ORDER BY row_index",
        run_dir.results,
    )
    errors_by_code = dict(
        con.sql("SELECT error_code, count(*) FROM chunk_rows WHERE NOT ok GROUP BY 1 ORDER BY 2 DESC").fetchall()
    )
    report = RunReport(
        run_dir=str(run_dir.root),
        total_rows=rows,
        succeeded=succeeded,
        failed=rows - succeeded,
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        output_path=str(run_dir.output),
        errors_path=str(run_dir.errors),
        results_path=str(run_dir.results),
        embeddings_path=str(run_dir.embeddings) if embedded else None,
        errors_by_code=errors_by_code,
    )
    report.save(run_dir.summary)
    return report


@task(name="merge-outputs")
def merge_outputs(plan: Plan, results: list[ShardResult], run_dir: str) -> RunReport:
    return _told(merge(plan, results, RunDir(run_dir)))


def _told(report: RunReport) -> RunReport:
    from prefect import get_run_logger

    errors = ", ".join(f"{code}={n}" for code, n in report.errors_by_code.items())
    get_run_logger().info(
        "merged %d rows: %d in output.jsonl, %d in errors.jsonl%s; %d prompt + %d completion tokens",
        report.total_rows,
        report.succeeded,
        report.failed,
        f" ({errors})" if errors else "",
        report.prompt_tokens,
        report.completion_tokens,
    )
    return report


@task(name="expire-unfinished")
def expire_unfinished(run_dir: str, deadline: str) -> RunReport:
    """Close a run whose deadline passed: finished rows merged, every other row a
    `batch_expired` error line (retryable with `nightshift retry`)."""
    rd = RunDir(run_dir)
    report = merge_unfinished(rd, EXPIRED_CODE, f"the run's deadline ({deadline}) passed before this row was generated")
    report = report.model_copy(update={"expired": True})
    report.save(rd.summary)
    return _told(report)


def _write_lines(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    reader = con.sql(query).to_arrow_reader(8192)
    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for batch in reader:
            for line in batch.column(0).to_pylist():
                out.write(line)
                out.write("\n")


def _write_embeddings(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """embeddings.parquet from the corpus rows' vectors, streamed batch by batch; the vector
    column is a fixed-size list (its width read from the first row), so every reader gets the
    dimension from the schema. Returns the rows written (0: not an embedding corpus)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    query = (
        "SELECT custom_id AS id, embedding, prompt_tokens AS tokens FROM chunk_rows "
        "WHERE ok AND line IS NULL AND embedding IS NOT NULL ORDER BY row_index"
    )
    first = con.sql(f"SELECT len(embedding) FROM ({query}) LIMIT 1").fetchall()
    if not first:
        return 0
    schema = pa.schema(
        [("id", pa.string()), ("embedding", pa.list_(pa.float32(), first[0][0])), ("tokens", pa.int64())]
    )
    written = 0
    with written_whole(path) as tmp, pq.ParquetWriter(tmp, schema) as out:
        for batch in con.sql(query).to_arrow_reader(8192):
            out.write_table(pa.Table.from_batches([batch]).cast(schema))
            written += batch.num_rows
    return written


def _copy_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    with written_whole(path) as tmp:
        con.execute(f"COPY ({query}) TO '{sql_path(tmp)}' (FORMAT parquet)")
