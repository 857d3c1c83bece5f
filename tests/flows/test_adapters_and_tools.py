"""Specification of rows addressed to LoRA adapters and rows with tools, in one batch file, on
the real engine: each adapter row is what the base model with that adapter merged (PEFT,
transformers) answers, each base row what the base model answers; the oracle gates adapters
too; forced tool calls come back in OpenAI's shape with arguments that follow their schema."""

import json

import pytest
from conftest import read_jsonl, write_jsonl
from lora_adapters import build_adapter, comparable, greedy_texts

from nightshift.models import model_dir

CLASSIFY = {
    "type": "function",
    "function": {
        "name": "classify",
        "description": "Label a message",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["spam", "ham"]}, "urgent": {"type": "boolean"}},
            "required": ["label", "urgent"],
            "additionalProperties": False,
        },
    },
}
MAX_TOKENS = 10


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what is the weather like in town {i}?"}]


def chat_row(custom_id: str, model: str, messages: list[dict], **body) -> dict:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(model_dir("tiny"), root / name, seed) for name, seed in (("support", 1), ("legal", 2))}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, prefect_server, adapters):
    """Base rows, rows of two adapters, forced and free tool calls and rows that must be refused,
    shuffled together in one file of two shards."""
    from nightshift.flows.run import run_job
    from nightshift.jobs import make_job

    root = tmp_path_factory.mktemp("adapters-run")
    rows = []
    for i in range(6):
        rows += [chat_row(f"{model}-{i}", model, question(i)) for model in ("tiny", "support", "legal")]
    forced = {"type": "function", "function": {"name": "classify"}}
    spam = [{"role": "user", "content": "Is 'WIN A PRIZE NOW' spam?"}]
    rows += [
        chat_row("named-base", "tiny", spam, tools=[CLASSIFY], tool_choice=forced, max_tokens=40),
        chat_row("named-support", "support", spam, tools=[CLASSIFY], tool_choice=forced, max_tokens=40),
        chat_row("required", "tiny", spam, tools=[CLASSIFY], tool_choice="required", parallel_tool_calls=False,
                 max_tokens=60),
        chat_row("auto", "tiny", spam, tools=[CLASSIFY]),
        chat_row("unknown-adapter", "marketing", spam),
        chat_row("tool-not-given", "tiny", spam, tools=[CLASSIFY],
                 tool_choice={"type": "function", "function": {"name": "translate"}}),
    ]  # fmt: skip
    rows = rows[::2] + rows[1::2]  # adapters' rows and base rows interleaved, not grouped
    path = write_jsonl(root / "in.jsonl", rows)
    job = make_job(
        "tiny", chunk_size=4, max_num_seqs=16, lora=[f"support={adapters['support']}", f"legal={adapters['legal']}"]
    )
    run_job(str(path), str(root / "run"), job, shard_size=13)
    return root / "run", job


def answers(run_dir) -> dict[str, dict]:
    return {line["custom_id"]: line["response"]["body"] for line in read_jsonl(run_dir / "output.jsonl")}


def test_every_adapter_row_is_the_merged_models_greedy_answer_and_every_base_row_the_base_models(mixed_run, adapters):
    run_dir, _ = mixed_run
    bodies = answers(run_dir)
    conversations = [question(i) for i in range(6)]
    expected = {"tiny": greedy_texts(model_dir("tiny"), None, conversations, MAX_TOKENS)}
    for name, path in adapters.items():
        expected[name] = greedy_texts(model_dir("tiny"), path, conversations, MAX_TOKENS)
    assert expected["support"] != expected["tiny"] and expected["legal"] != expected["tiny"]  # adapters matter
    for model, texts in expected.items():
        got = [bodies[f"{model}-{i}"]["choices"][0]["message"]["content"] for i in range(6)]
        assert [comparable(t) for t in got] == [comparable(t) for t in texts], model
        assert {bodies[f"{model}-{i}"]["model"] for i in range(6)} == {model}  # the response names its adapter


def test_the_oracle_gates_adapter_rows_on_the_merged_reference_and_a_swapped_adapter_fails(mixed_run, adapters):
    from nightshift.config import CanaryConfig
    from nightshift.records import Verdict
    from nightshift.runtime.rundir import RunDir
    from nightshift.validation.gate import validate

    run_dir, job = mixed_run
    verdict = Verdict.load(run_dir / "validation.json")
    assert verdict.validated, verdict.failures
    scored = {r.adapter for r in verdict.checks["oracle"].results}
    assert scored == {None, "support", "legal"}  # every model of the run sampled

    swapped = CanaryConfig(oracle_lora=[f"support={adapters['legal']}"], determinism_samples=0)
    refused = validate(RunDir(run_dir), job, swapped)
    assert not refused.validated
    failed = [r for r in refused.checks["oracle"].results if not r.agrees]
    assert failed and {r.adapter for r in failed} == {"support"}
    assert "support-" in refused.failures[0]


def test_forced_tool_call_rows_are_asked_again_and_must_call_the_same(mixed_run):
    """Constrained rows (a grammar picks the tokens) are no oracle's to score, but the
    determinism re-ask covers them (issue 50): the forced calls come back the same."""
    from nightshift.config import CanaryConfig
    from nightshift.runtime.rundir import RunDir
    from nightshift.validation.gate import validate

    run_dir, job = mixed_run
    only_reask = CanaryConfig(oracle_samples=0, settings_gate_samples=0, determinism_samples=40)
    verdict = validate(RunDir(run_dir), job, only_reask)
    reasked = {r.custom_id: r.same for r in verdict.checks["determinism"].results}
    assert {"named-base", "named-support", "required"} <= set(reasked), sorted(reasked)
    assert verdict.state == "validated" and all(reasked.values()), verdict.failures


def test_the_report_breaks_rows_tokens_and_cost_down_per_adapter(mixed_run):
    run_dir, _ = mixed_run
    report = json.loads((run_dir / "report.json").read_text())
    by_model = report["by_model"]
    assert set(by_model) == {"tiny", "support", "legal"}
    assert by_model["legal"]["rows"] == 6 and by_model["support"]["rows"] == 7 and by_model["tiny"]["rows"] == 9
    assert sum(m["prompt_tokens"] + m["completion_tokens"] for m in by_model.values()) == report["total_tokens"]
    assert sum(m["cost_on_demand"] for m in by_model.values()) == pytest.approx(report["cost_on_demand"], abs=1e-5)
    assert "| support | 7 |" in (run_dir / "report.md").read_text()


def test_forced_tool_calls_come_back_in_openais_shape_with_arguments_that_follow_the_schema(mixed_run):
    run_dir, _ = mixed_run
    bodies = answers(run_dir)
    for custom_id in ("named-base", "named-support", "required"):
        choice = bodies[custom_id]["choices"][0]
        message = choice["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1, custom_id
        call = message["tool_calls"][0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "classify"
        assert not any(blank in call["function"]["arguments"] for blank in "\n\r\t")  # no room to loop on blanks
        arguments = json.loads(call["function"]["arguments"])
        assert arguments["label"] in ("spam", "ham") and isinstance(arguments["urgent"], bool)
    # as OpenAI and vLLM: a named function ends "stop", "required" calls end "tool_calls"
    assert bodies["named-base"]["choices"][0]["finish_reason"] == "stop"
    assert bodies["required"]["choices"][0]["finish_reason"] == "tool_calls"
    assert bodies["named-support"]["model"] == "support"
    # tool_choice auto: the model's own words (this random one calls nothing), as text
    assert isinstance(bodies["auto"]["choices"][0]["message"]["content"], str)


def test_rows_naming_an_unknown_model_or_tool_are_refused_per_row_and_nothing_is_lost(mixed_run):
    run_dir, _ = mixed_run
    errors = {line["custom_id"]: line["error"] for line in read_jsonl(run_dir / "errors.jsonl")}
    assert errors["unknown-adapter"]["code"] == "model_not_found"
    assert "'support'" in errors["unknown-adapter"]["message"] and "'legal'" in errors["unknown-adapter"]["message"]
    assert (
        errors["tool-not-given"]["code"] == "invalid_request" and "tool_choice" in errors["tool-not-given"]["message"]
    )
    assert len(errors) + len(answers(run_dir)) == 24
