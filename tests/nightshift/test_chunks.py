"""Specification of best-row selection over chunk files: a success beats an error, then the
most recent outcome wins; every row once."""

import duckdb
import pytest

from nightshift.stages.chunks import best_rows_sql, retryable_rows, rows_on_disk, write_chunk

pytestmark = pytest.mark.fast


def record(row_index: int, ok: bool, text: str | None = None, code: str | None = None) -> dict:
    return {
        "row_index": row_index,
        "shard": 0,
        "custom_id": f"r{row_index}",
        "ok": ok,
        "line": "{}",
        "text": text,
        "finish_reason": "stop" if ok else None,
        "prompt_tokens": 1 if ok else None,
        "completion_tokens": 1 if ok else None,
        "error_code": code,
        "source": "engine" if ok else None,
    }


def best(tmp_path) -> dict:
    files = sorted(tmp_path.glob("chunk-*.parquet"))
    with duckdb.connect() as con:
        rows = con.sql(f"SELECT row_index, ok, text, error_code FROM ({best_rows_sql(files)}) ORDER BY 1").fetchall()
    return {r[0]: r[1:] for r in rows}


def test_a_retried_success_supersedes_the_earlier_error_and_rows_stay_unique(tmp_path):
    write_chunk(tmp_path, [record(0, True, "first"), record(1, False, code="engine_error"), record(2, True, "two")])
    assert retryable_rows(tmp_path) == {1}
    write_chunk(tmp_path, [record(1, True, "retried")])
    assert best(tmp_path) == {0: (True, "first", None), 1: (True, "retried", None), 2: (True, "two", None)}
    assert retryable_rows(tmp_path) == set() and rows_on_disk(tmp_path) == {0, 1, 2}


def test_a_later_error_does_not_replace_a_success_but_a_later_success_replaces_an_older_one(tmp_path):
    write_chunk(tmp_path, [record(0, True, "old")])
    write_chunk(tmp_path, [record(0, False, code="engine_error")])
    assert best(tmp_path)[0] == (True, "old", None)
    write_chunk(tmp_path, [record(0, True, "new")])  # a duplicated straggler's later outcome
    assert best(tmp_path)[0] == (True, "new", None)
