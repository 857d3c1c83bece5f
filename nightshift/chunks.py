"""The chunk file: the unit in which generated rows reach the disk.

A shard's output directory holds chunk files `chunk-<time_ns>-<random>.parquet`, each
written whole under a temporary name and renamed. A row may appear in more than one chunk
after `nightshift retry` (a failed row retried) or a duplicated straggler; readers take its
best outcome: a success over an error, then the most recent.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("shard", pa.int32()),
        ("custom_id", pa.string()),
        ("ok", pa.bool_()),
        ("line", pa.string()),  # the output.jsonl or errors.jsonl line
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error_code", pa.string()),
        # "engine"; "duplicate": an identical deterministic row's output; "cache": the result cache's
        ("source", pa.string()),
    ]
)

# Errors worth another attempt: the engine failed, not the request.
RETRYABLE_CODES = ("engine_error",)


def chunk_files(output_dir: Path) -> list[Path]:
    return sorted(Path(output_dir).glob("chunk-*.parquet"))


def write_chunk(output_dir: Path, records: list[dict]) -> Path:
    # Unique, time-ordered names: a chunk never overwrites another, whoever else writes here.
    path = Path(output_dir) / f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(sorted(records, key=lambda r: r["row_index"]), schema=CHUNK_SCHEMA), tmp)
    os.replace(tmp, path)  # a chunk file either is whole or does not exist
    return path


def sql_path_list(files) -> str:
    """A DuckDB list literal of file paths, quotes escaped."""
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def best_rows_sql(files: list[str | Path]) -> str:
    """SQL selecting each row's best outcome across `files` (see module docstring)."""
    return f"""
        SELECT * EXCLUDE (filename) FROM read_parquet({sql_path_list(files)}, filename = true)
        QUALIFY row_number() OVER (PARTITION BY row_index ORDER BY ok DESC, filename DESC) = 1
    """


def rows_on_disk(output_dir: Path) -> set[int]:
    """Rows that already have an outcome (output or error) in a chunk file."""
    files = chunk_files(output_dir)
    if not files:
        return set()
    return set(pq.read_table(files, columns=["row_index"])["row_index"].to_pylist())


def retryable_rows(output_dir: Path) -> set[int]:
    """Rows whose best outcome is a retryable error."""
    files = chunk_files(output_dir)
    if not files:
        return set()
    import duckdb

    codes = ", ".join(f"'{c}'" for c in RETRYABLE_CODES)
    with duckdb.connect() as con:
        found = con.sql(f"SELECT row_index FROM ({best_rows_sql(files)}) WHERE NOT ok AND error_code IN ({codes})")
        return {row[0] for row in found.fetchall()}
