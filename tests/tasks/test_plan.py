"""Specification of the plan stage: fixed-size, deterministic, content-hashed shards."""

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, write_jsonl

from nightshift.rundir import RunDir
from nightshift.tasks.s1_plan_shards import plan

pytestmark = pytest.mark.fast


def test_shards_are_fixed_size_and_cover_every_row_in_order(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_request(f"r{i}", f"text {i}") for i in range(25)])
    result = plan(str(path), RunDir(tmp_path / "run"), shard_size=10)
    assert [s.num_rows for s in result.shards] == [10, 10, 5]
    assert [s.first_row for s in result.shards] == [0, 10, 20]
    assert result.total_rows == 25
    ids = [cid for s in result.shards for cid in pq.read_table(s.path)["custom_id"].to_pylist()]
    assert ids == [f"r{i}" for i in range(25)]


def test_the_same_input_plans_to_the_same_hashes_and_a_changed_row_changes_one(tmp_path):
    rows = [chat_request(f"r{i}", f"text {i}") for i in range(25)]
    first = plan(str(write_jsonl(tmp_path / "a.jsonl", rows)), RunDir(tmp_path / "a"), shard_size=10)
    again = plan(str(tmp_path / "a.jsonl"), RunDir(tmp_path / "b"), shard_size=10)
    rows[13] = chat_request("r13", "edited")
    edited = plan(str(write_jsonl(tmp_path / "c.jsonl", rows)), RunDir(tmp_path / "c"), shard_size=10)
    hashes = lambda p: [s.content_hash for s in p.shards]  # noqa: E731
    assert hashes(first) == hashes(again)
    assert [a == b for a, b in zip(hashes(first), hashes(edited))] == [True, False, True]
