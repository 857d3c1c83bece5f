"""The template lint: text that many rows share, placed after each row's own content, is text
vLLM's prefix cache can never serve — the plan says so, and where to move it."""

import json

import pytest
from conftest import write_jsonl

from nightshift.runtime.rundir import RunDir
from nightshift.samples import sample_documents
from nightshift.stages.layout import misplaced_shared_text
from nightshift.stages.plan import plan

pytestmark = pytest.mark.fast

INSTRUCTION = (
    "Read the contract above. List every party, the effective date, the monthly fee and the notice period, "
    "one per line, as 'field: value'. If a field is missing write 'unknown'. Do not add any other text, "
    "commentary or formatting of your own."
)


def chat(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def documents(count: int = 40) -> list[str]:
    return [doc["text"] for doc in sample_documents(count, seed=11)]


def test_a_shared_instruction_after_each_rows_document_is_named_with_its_message_and_text():
    prompts = [chat("You extract fields.", f"{text}\n\n{INSTRUCTION}") for text in documents()]
    lint = misplaced_shared_text(prompts)
    assert lint is not None and lint.rows_affected == lint.rows_sampled == 40
    assert lint.where == "from message 2 of 2 (user)"
    assert lint.shared_end_chars >= len(INSTRUCTION) and lint.shared_start_chars < 60
    assert INSTRUCTION[:30] in lint.snippet
    assert "every row shares first" in lint.advice and "own content last" in lint.advice
    assert "40 of" not in lint.message() and "100% of rows (of 40 sampled)" in lint.message()


def test_the_same_rows_with_the_instruction_first_are_laid_out_well():
    prompts = [chat("You extract fields.", f"{INSTRUCTION}\n\n{text}") for text in documents()]
    assert misplaced_shared_text(prompts) is None


def test_questions_after_a_shared_document_are_not_flagged_the_document_is_the_bigger_share():
    text = documents(1)[0] * 3  # one long document, many questions about it, each asked of other documents too
    questions = [f"Question {q}: " + "what does the contract say about the fee and the term? " * 4 for q in range(10)]
    prompts = [chat(None, f"{text}\n\n{question}") for question in questions]
    assert misplaced_shared_text(prompts) is None


def test_identical_rows_short_endings_and_few_rows_say_nothing():
    assert misplaced_shared_text([chat(None, f"{INSTRUCTION}")] * 50) is None  # all shared, at the start too
    assert misplaced_shared_text([chat(None, f"{text} Summarize.") for text in documents()]) is None
    assert misplaced_shared_text([chat(None, f"{text}\n\n{INSTRUCTION}") for text in documents(5)]) is None
    assert misplaced_shared_text([[101, 7592, 102]] * 50) is None  # token ids: nothing to read


def test_completions_prompts_are_linted_too():
    lint = misplaced_shared_text([f"{text}\n\n{INSTRUCTION}" for text in documents()])
    assert lint is not None and lint.where == "in the prompt"


def test_the_plan_of_a_corpus_whose_template_puts_the_text_first_names_the_template(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(documents())])
    from nightshift.config import CorpusOptions

    bad = plan(str(corpus), RunDir(tmp_path / "bad"), corpus=CorpusOptions(template="{text}\n\n" + INSTRUCTION))
    good = plan(str(corpus), RunDir(tmp_path / "good"), corpus=CorpusOptions(template=INSTRUCTION + "\n\n{text}"))

    assert bad.misplaced_shared_text is not None and "--template" in bad.misplaced_shared_text.advice
    assert good.misplaced_shared_text is None
    saved = json.loads((tmp_path / "bad" / "plan" / "manifest.json").read_text())
    assert saved["misplaced_shared_text"]["rows_affected"] == 40
