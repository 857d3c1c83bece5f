"""Specification of the plan stage: bounded, deterministic, content-hashed shards — input slices, or
whole prefix groups when rows sharing a prompt prefix lie scattered over the input."""

import json
import random

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, write_jsonl

from nightshift.inputs import InputRow
from nightshift.runtime.rundir import RunDir
from nightshift.stages.canaries import CANARY_PREFIX
from nightshift.stages.plan import plan

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


def document_questions(docs: int, questions: int, seed: int = 3) -> list[dict]:
    """`docs` long documents × `questions` questions each, exported in a shuffled order."""
    rows = [
        chat_request(f"d{d}q{q}", f"Document {d}: " + f"paragraph {d} " * 120 + f"\n\nQuestion {q}?")
        for d in range(docs)
        for q in range(questions)
    ]
    random.Random(seed).shuffle(rows)
    return rows


def shard_rows(result) -> list[list[dict]]:
    return [pq.read_table(s.path).to_pylist() for s in result.shards]


def test_a_documents_questions_scattered_over_the_input_are_gathered_into_one_shard(tmp_path):
    rows = document_questions(docs=12, questions=10)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = plan(str(path), RunDir(tmp_path / "run"), shard_size=25)

    assert result.layout == "prefix-groups"
    assert result.shareable_prompt_share_regrouped > result.shareable_prompt_share_input_order + 0.2
    shards = shard_rows(result)
    assert all(len(rows_) <= 25 for rows_ in shards)
    shard_of_document = {}
    for index, rows_ in enumerate(shards):
        for row in rows_:
            shard_of_document.setdefault(row["custom_id"].split("q")[0], set()).add(index)
    split = [doc for doc, where in shard_of_document.items() if len(where) > 1]
    assert len(split) <= len(shards) - 1, "at most one document cut at each shard boundary"
    # every input row once, each under its input position, each shard's rows in input order
    indices = [row["row_index"] for rows_ in shards for row in rows_]
    assert sorted(indices) == list(range(120))
    assert all([r["row_index"] for r in rows_] == sorted(r["row_index"] for r in rows_) for rows_ in shards)
    assert all(rows[row["row_index"]]["custom_id"] == row["custom_id"] for rows_ in shards for row in rows_)


def test_regrouped_shards_are_the_same_on_every_plan_and_canaries_ride_in_each(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", document_questions(docs=12, questions=10))
    canaries = [
        InputRow(i + 1, f"{CANARY_PREFIX}{i}", json.dumps(chat_request("c", "two plus two?")), None) for i in range(6)
    ]
    first = plan(str(path), RunDir(tmp_path / "a"), shard_size=25, canaries=canaries)
    again = plan(str(path), RunDir(tmp_path / "b"), shard_size=25, canaries=canaries)

    assert [s.content_hash for s in first.shards] == [s.content_hash for s in again.shards]
    assert first.total_rows == 126
    riding = [
        [r["custom_id"] for r in rows_ if r["custom_id"].startswith(CANARY_PREFIX)] for rows_ in shard_rows(first)
    ]
    assert all(riding), "a canary in every shard"
    assert sum(map(len, riding)) == 6


def test_rows_already_grouped_or_sharing_nothing_stay_input_slices(tmp_path):
    grouped = sorted(document_questions(docs=12, questions=10), key=lambda row: row["custom_id"])
    unique = [chat_request(f"r{i}", f"{i} " + "unrelated words " * 40) for i in range(120)]
    for name, rows in (("grouped", grouped), ("unique", unique)):
        result = plan(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), RunDir(tmp_path / name), shard_size=25)
        assert result.layout == "input-slices", name
        assert [s.first_row for s in result.shards] == [0, 25, 50, 75, 100]


def test_keep_order_keeps_shards_as_input_slices(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", document_questions(docs=12, questions=10))
    result = plan(str(path), RunDir(tmp_path / "run"), shard_size=25, group_prefixes=False)
    assert result.layout == "input-slices"
    assert [s.num_rows for s in result.shards] == [25, 25, 25, 25, 20]
