"""The order a shard's rows go to the engine, and the prefix-cache hit rate an order predicts."""

import random
from types import SimpleNamespace

import pytest

from nightshift.stages.layout import PrefixCacheModel, prefix_order, prompt_key

pytestmark = pytest.mark.fast


def question(doc: int, q: int, key: int) -> SimpleNamespace:
    messages = [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": f"Document {doc}: " + "lorem ipsum " * 50 + f"\n\nQuestion {q}?"},
    ]
    return SimpleNamespace(key=key, prompt=messages)


def shuffled_documents(docs=6, questions=5, seed=7):
    rows = [question(d, q, 0) for d in range(docs) for q in range(questions)]
    random.Random(seed).shuffle(rows)
    for key, row in enumerate(rows):
        row.key = key
    return rows


def document_of(row) -> str:
    return row.prompt[1]["content"].split(":")[0]


def test_rows_sharing_a_document_go_to_the_engine_together():
    ordered = prefix_order(shuffled_documents())
    runs = [document_of(row) for row in ordered]
    groups = [doc for i, doc in enumerate(runs) if i == 0 or runs[i - 1] != doc]
    assert len(groups) == 6, "each document's questions contiguous"


def test_the_same_rows_always_give_the_same_order_and_ties_keep_input_order():
    rows = shuffled_documents()
    twins = [question(9, 0, 100), question(9, 0, 101)]
    first = prefix_order(rows + twins)
    assert [r.key for r in first] == [r.key for r in prefix_order(rows + twins)]
    assert [r.key for r in first if r.key >= 100] == [100, 101]


def test_the_longest_work_goes_first_while_every_document_stays_together():
    rows = shuffled_documents()
    long_row = next(r for r in rows if document_of(r) == "Document 4" and r.prompt[1]["content"].endswith("3?"))
    work = {id(r): 400 if r is long_row else 16 for r in rows}

    ordered = prefix_order(rows, work_of=lambda r: work[id(r)])

    assert ordered[0] is long_row, "the longest row first"
    runs = [document_of(row) for row in ordered]
    assert runs[:5] == ["Document 4"] * 5, "its document's questions right after it, while it is cached"
    assert len([doc for i, doc in enumerate(runs) if i == 0 or runs[i - 1] != doc]) == 6
    assert ordered[5:] == [r for r in prefix_order(rows) if document_of(r) != "Document 4"], "ties: key order"


def test_rows_sharing_nothing_but_the_system_prompt_run_longest_first_and_equal_work_keeps_key_order():
    rows = [
        SimpleNamespace(key=i, prompt=[{"role": "system", "content": "Classify."}, {"role": "user", "content": text}])
        for i, text in enumerate(["apple", "pear", "fig", "kiwi", "plum"])
    ]
    budget = {"apple": 8, "pear": 512, "fig": 8, "kiwi": 64, "plum": 8}

    ordered = prefix_order(rows, work_of=lambda r: budget[r.prompt[1]["content"]])

    assert [r.prompt[1]["content"] for r in ordered] == ["pear", "kiwi", "apple", "fig", "plum"]
    assert prefix_order(rows, work_of=lambda r: 8) == prefix_order(rows), "equal work: the plain prefix order"


def test_identical_prompts_keep_their_order_whatever_their_work():
    rows = [SimpleNamespace(key=i, prompt="same prompt") for i in range(4)]
    assert [r.key for r in prefix_order(rows, work_of=lambda r: r.key)] == [0, 1, 2, 3]


def test_keys_follow_the_prompt_as_rendered_message_by_message():
    short = [{"role": "user", "content": "ab"}]
    longer = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "ab"}]}]
    assert prompt_key(short) < prompt_key(longer)
    assert prompt_key(parts) == prompt_key(short), "content parts key as the template joins their text"
    assert prompt_key([5, 6, 7]) < prompt_key([5, 7]), "token-id prompts sort by their ids"


def blocks_of(doc: int, q: int) -> list[int]:
    return [doc] * 300 + [1000 + q] * 10  # a 300-token document, then a 10-token question


def test_a_small_cache_serves_the_grouped_order_far_better_than_a_shuffled_one():
    rows = [(d, q) for d in range(20) for q in range(5)]
    random.Random(3).shuffle(rows)
    shuffled, grouped = PrefixCacheModel(640, 16), PrefixCacheModel(640, 16)
    for d, q in rows:
        shuffled.run(blocks_of(d, q), 8)
    for d, q in sorted(rows):
        grouped.run(blocks_of(d, q), 8)
    # four of a document's five rows hit its 18 full blocks (288 of 310 tokens)
    assert grouped.hit_rate == pytest.approx(4 / 5 * 288 / 310, abs=0.01)
    assert shuffled.hit_rate < grouped.hit_rate / 2


def test_an_unbounded_cache_predicts_the_same_for_any_order_and_unique_prompts_never_hit():
    rows = [(d, q) for d in range(10) for q in range(3)]
    orders = [rows, sorted(rows, key=lambda r: (r[1], r[0]))]
    rates = []
    for order in orders:
        model = PrefixCacheModel(None, 16)
        for d, q in order:
            model.run(blocks_of(d, q), 8)
        rates.append(model.hit_rate)
    assert rates[0] == rates[1]
    unique = PrefixCacheModel(None, 16)
    for i in range(50):
        unique.run([i] * 64, 8)
    assert unique.hit_rate == 0.0


def test_a_prompt_cached_whole_still_computes_its_last_token():
    model = PrefixCacheModel(None, 16)
    model.run(list(range(32)), 1)
    model.run(list(range(32)), 1)
    assert model.hit_tokens == 31
