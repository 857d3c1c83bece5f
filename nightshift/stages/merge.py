"""Merging: the shards' chunk files become the run's outputs, in input order.

Plain SQL over the chunk Parquet files, one shard at a time (memory holds one shard, whatever
the run's size, when shards are consecutive row ranges: their rows appended in plan order are
the input order; shards regrouped by prompt prefix are gathered and sorted by DuckDB on disk):

* ``output.jsonl``  — OpenAI Batch output lines of the rows that succeeded
* ``errors.jsonl``  — OpenAI-style error lines of the rows that failed
* ``results.parquet`` — custom_id, text, finish_reason, prompt_tokens, completion_tokens, shard,
  source, model (the row's LoRA adapter; null: the base model), image_tokens (of its prompt's)
* ``embeddings.parquet`` — an embedded corpus: id, embedding (fixed-size list of float32),
  tokens, in input order; read as-is by DuckDB, pyarrow and pandas

Each row's best outcome is taken (see nightshift/stages/chunks.py), and each shard is proved to hold
exactly its planned rows. Each output is written whole (a local temporary, then one rename or
one upload to the bucket) once every shard is in: a reader never sees a half-merged run, and a
run that would lose or repeat a row changes no output at all.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from nightshift.config import JobSpec
from nightshift.errors import NightshiftError
from nightshift.records import Plan, RunReport, Shard, ShardResult
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, local_copies, read_table, written_whole
from nightshift.stages.canaries import CANARY_PREFIX
from nightshift.stages.chunks import (
    CHUNK_SCHEMA,
    ChunkWriter,
    best_rows_sql,
    chunk_files,
    rows_on_disk,
    shard_cache_key,
)

RESULTS_COLUMNS = [
    "custom_id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "shard", "source", "model",
    "image_tokens",
]  # fmt: skip


class IncompleteRun(NightshiftError, RuntimeError):
    """Some planned row is missing from, or repeated in, the generated chunks."""


def merge(plan: Plan, results: list[ShardResult], run_dir: RunDir) -> RunReport:
    return _merge_directories(plan, {result.shard_index: result.output_dir for result in results}, run_dir)


def merge_unfinished(run_dir: RunDir, code: str, message: str) -> RunReport:
    """Close a run stopped before its end (a batch cancelled, or out of its completion window).

    Every planned row without an outcome gets an error line with `code` (OpenAI's
    `batch_expired`, say), written as a chunk of its own shard; then the run merges as usual:
    each row ends in the outputs or the errors, exactly once. The run's process must be gone.
    """
    plan, job = Plan.load(run_dir.plan_manifest), JobSpec.load(run_dir.job)
    directories = {}
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
        directories[shard.index] = directory
    return _merge_directories(plan, directories, run_dir)


def _merge_directories(plan: Plan, directories: dict[int, str], run_dir: RunDir) -> RunReport:
    """Shard after shard, in plan order. Shards that are consecutive row ranges are appended
    one at a time, each in row order: the whole run in input order, memory one shard. Shards
    regrouped by prompt prefix hold rows from anywhere: they gather in one DuckDB table (on
    local disk past its memory limit), written out in row order once all are in."""
    totals = _Totals()
    scattered = plan.layout == "prefix-groups"
    with (
        tempfile.TemporaryDirectory(prefix="nightshift-merge-") as scratch,
        duckdb_connection(*((f"{scratch}/run.duckdb", GATHER_MEMORY) if scattered else ())) as con,
        _Outputs(run_dir, canaries=plan.canary_rows > 0) as outputs,
    ):
        for shard in plan.shards:
            # Every chunk in the shard's directory: `nightshift retry` may have added some since.
            files = chunk_files(directories[shard.index]) if shard.index in directories else []
            with local_copies(files) as files:
                _load_shard(con, shard, files, scattered)
                if scattered:
                    con.execute(
                        "CREATE TABLE IF NOT EXISTS run_rows AS SELECT * FROM shard_rows LIMIT 0;"
                        "INSERT INTO run_rows SELECT * FROM shard_rows"
                    )
                else:
                    totals.add(con)
                    outputs.append(con)
        if scattered:
            _check_whole_run(con, plan)
            totals.add(con)
            outputs.append(con)
    report = RunReport(
        run_dir=str(run_dir.root),
        total_rows=totals.rows,
        succeeded=totals.succeeded,
        failed=totals.rows - totals.succeeded,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        cached_tokens=totals.cached_tokens,
        output_path=str(run_dir.output),
        errors_path=str(run_dir.errors),
        results_path=str(run_dir.results),
        embeddings_path=str(run_dir.embeddings) if outputs.embedded else None,
        errors_by_code=dict(sorted(totals.errors_by_code.items(), key=lambda item: -item[1])),
    )
    report.save(run_dir.summary)
    return report


# DuckDB's memory while it gathers regrouped shards; past it, their rows and sorts go to local disk.
GATHER_MEMORY = "256MB"


def _load_shard(con: duckdb.DuckDBPyConnection, shard: Shard, files: list, scattered: bool = False) -> None:
    """`shard_rows`: the shard's best row for each row index, after proving that they are
    exactly the shard's planned rows: none missing, none repeated, none from elsewhere (for a
    regrouped shard, its count here and the whole run's rows in `_check_whole_run`)."""
    if not files:
        raise IncompleteRun(
            f"shard {shard.index} has no generated rows ({shard.num_rows} planned): "
            "refusing to write outputs that lose rows"
        )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE shard_rows AS
        SELECT *, starts_with(coalesce(custom_id, ''), '{CANARY_PREFIX}') AS canary
        FROM ({best_rows_sql(files)}) ORDER BY row_index
        """
    )
    rows, first, last = con.sql("SELECT count(*), min(row_index), max(row_index) FROM shard_rows").fetchall()[0]
    if scattered and rows != shard.num_rows:
        raise IncompleteRun(
            f"shard {shard.index} planned {shard.num_rows} rows but its chunks hold {rows}: "
            "refusing to write outputs that lose or repeat rows"
        )
    if not scattered and (rows, first, last) != (shard.num_rows, shard.first_row, shard.first_row + shard.num_rows - 1):
        raise IncompleteRun(
            f"shard {shard.index} planned rows {shard.first_row}..{shard.first_row + shard.num_rows - 1} "
            f"({shard.num_rows}) but its chunks hold {rows} rows ({first}..{last}): "
            "refusing to write outputs that lose or repeat rows"
        )


def _check_whole_run(con: duckdb.DuckDBPyConnection, plan: Plan) -> None:
    """Every row index of the plan exactly once over all regrouped shards; then `shard_rows` is
    the whole run, for the totals and the outputs."""
    rows, distinct, first, last = con.sql(
        "SELECT count(*), count(DISTINCT row_index), min(row_index), max(row_index) FROM run_rows"
    ).fetchall()[0]
    if (rows, distinct, first, last) != (plan.total_rows, plan.total_rows, 0, plan.total_rows - 1):
        raise IncompleteRun(
            f"the plan holds rows 0..{plan.total_rows - 1} but the shards' chunks hold {rows} rows, "
            f"{distinct} distinct ({first}..{last}): refusing to write outputs that lose or repeat rows"
        )
    con.execute("DROP TABLE shard_rows; CREATE TEMP VIEW shard_rows AS SELECT * FROM run_rows")


class _Totals:
    """The user's rows counted shard by shard (canary rows rode along for validation only)."""

    def __init__(self) -> None:
        self.rows = self.succeeded = self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.errors_by_code: dict[str, int] = {}

    def add(self, con: duckdb.DuckDBPyConnection) -> None:
        rows, succeeded, prompt_tokens, completion_tokens, cached_tokens = con.sql(
            """
            SELECT count(*), count(*) FILTER (WHERE ok),
                   coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
                   coalesce(sum(cached_tokens) FILTER (WHERE ok), 0)
            FROM shard_rows WHERE NOT canary
            """
        ).fetchall()[0]
        self.cached_tokens += int(cached_tokens)
        self.rows += rows
        self.succeeded += succeeded
        self.prompt_tokens += int(prompt_tokens)
        self.completion_tokens += int(completion_tokens)
        for code, count in con.sql(
            "SELECT error_code, count(*) FROM shard_rows WHERE NOT canary AND NOT ok GROUP BY 1"
        ).fetchall():
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + count


class _Outputs:
    """The run's output files, appended to shard by shard. Each is written to a local temporary
    and becomes its file or object whole when every shard is in (nightshift.runtime.storage); if any
    shard fails its check, none of them changes."""

    RESULTS = pa.schema([CHUNK_SCHEMA.field(name) for name in RESULTS_COLUMNS])

    def __init__(self, run_dir: RunDir, canaries: bool) -> None:
        self.run_dir = run_dir
        self.with_canaries = canaries  # the canary rows' own file, for validation
        self.files = ExitStack()
        self.embedded = 0
        self._embeddings: pq.ParquetWriter | None = None

    def __enter__(self) -> _Outputs:
        try:
            self._open()
        except BaseException:
            self.files.close()
            raise
        return self

    def _open(self) -> None:
        self.output = self._text(self.run_dir.output)
        self.errors = self._text(self.run_dir.errors)
        self.results = self._parquet(self.run_dir.results, self.RESULTS)
        self.canaries = self._parquet(self.run_dir.canary_results, CHUNK_SCHEMA) if self.with_canaries else None

    def __exit__(self, *exc_info) -> bool:
        return self.files.__exit__(*exc_info)

    def append(self, con: duckdb.DuckDBPyConnection) -> None:
        lines = "SELECT line FROM shard_rows WHERE NOT canary AND {} ORDER BY row_index"
        _write_lines(con, lines.format("ok AND line IS NOT NULL"), self.output)
        _write_lines(con, lines.format("NOT ok"), self.errors)
        columns = ", ".join(RESULTS_COLUMNS)
        _write_parquet(con, f"SELECT {columns} FROM shard_rows WHERE NOT canary ORDER BY row_index", self.results)
        self._append_embeddings(con)
        if self.canaries is not None:
            _write_parquet(
                con, "SELECT * EXCLUDE (canary) FROM shard_rows WHERE canary ORDER BY row_index", self.canaries
            )

    def _append_embeddings(self, con: duckdb.DuckDBPyConnection) -> None:
        """embeddings.parquet from the corpus rows' vectors; the vector column is a fixed-size
        list (its width read from the first row), so every reader gets the dimension from the
        schema. Not written for a run that embedded no corpus."""
        query = (
            "SELECT custom_id AS id, embedding, prompt_tokens AS tokens FROM shard_rows "
            "WHERE NOT canary AND ok AND line IS NULL AND embedding IS NOT NULL ORDER BY row_index"
        )
        if self._embeddings is None:
            first = con.sql(f"SELECT len(embedding) FROM ({query}) LIMIT 1").fetchall()
            if not first:
                return
            schema = pa.schema(
                [("id", pa.string()), ("embedding", pa.list_(pa.float32(), first[0][0])), ("tokens", pa.int64())]
            )
            self._embeddings = self._parquet(self.run_dir.embeddings, schema)
        self.embedded += _write_parquet(con, query, self._embeddings)

    def _text(self, path):
        return self.files.enter_context(open(self.files.enter_context(written_whole(path)), "w", encoding="utf-8"))

    def _parquet(self, path, schema: pa.Schema) -> pq.ParquetWriter:
        return self.files.enter_context(pq.ParquetWriter(self.files.enter_context(written_whole(path)), schema))


def _write_lines(con: duckdb.DuckDBPyConnection, query: str, out) -> None:
    for batch in con.sql(query).to_arrow_reader(8192):
        for line in batch.column(0).to_pylist():
            out.write(line)
            out.write("\n")


def _write_parquet(con: duckdb.DuckDBPyConnection, query: str, out: pq.ParquetWriter) -> int:
    written = 0
    for batch in con.sql(query).to_arrow_reader(8192):
        out.write_table(pa.Table.from_batches([batch]).cast(out.schema))
        written += batch.num_rows
    return written
