"""Specification of the main flow on the real engine (tiny model) and a real Prefect server.

One mixed batch runs once for the module: good rows of every supported shape and bad rows
of several kinds, across several shards and chunks.
"""

import json

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, read_jsonl, write_jsonl

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["invoice", "contract", "review"]}},
    "required": ["label"],
    "additionalProperties": False,
}


def mixed_batch() -> list:
    rows = [chat_request(f"plain-{i}", f"Document number {i} about invoices") for i in range(14)]
    rows.insert(3, "{broken json")
    rows.insert(7, chat_request("plain-2", "duplicate id"))
    rows += [
        chat_request(
            "structured",
            "Classify",
            max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}},
        ),
        chat_request("logprobs", "Hello", logprobs=True, top_logprobs=2),
        chat_request("two-choices", "Hello", n=2, temperature=0.8, seed=1),
        chat_request("stopped", "Hello", stop=["e"], max_completion_tokens=6),
        {
            "custom_id": "completion",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0},
        },
        chat_request("other-model", "Hello", model="gpt-4o-mini"),
        chat_request("unknown-field", "Hello", frobnicate=True),
        chat_request("too-long", "word " * 3000),
        chat_request("bad-type", "Hello", temperature="hot"),
        chat_request("streaming", "Hello", stream=True),
        b"\xff\xfe not utf-8",
        "[1, 2, 3]",
        {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
        {**chat_request("get", "x"), "method": "GET"},
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},  # a chat job
        {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"},
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        {"custom_id": "no-prompt", "method": "POST", "url": "/v1/completions", "body": {"max_tokens": 3}},
        {"custom_id": 42, "method": "POST", "url": "/v1/chat/completions", "body": {}},
        chat_request("empty", "   "),
        chat_request("huge-max-tokens", "Hello", max_tokens=100_000),
        chat_request("zero-max-tokens", "Hello", max_tokens=0),
        chat_request("after-the-bad-ones", "Still fine"),
        # the Responses API: plain-0's question, asked as a Response; a built-in tool, the row's error
        {
            "custom_id": "responses",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"input": "Document number 0 about invoices", "max_output_tokens": 8, "temperature": 0},
        },
        {
            "custom_id": "responses-web-search",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"input": "News?", "tools": [{"type": "web_search"}]},
        },
    ]
    # rows 16–19, one shard: identical requests, greedy and sampled
    rows[16:16] = [
        chat_request("twin-a", "Twins share one answer", max_tokens=6),
        chat_request("dice-a", "Roll the dice", max_tokens=6, temperature=1.0),
        chat_request("twin-b", "Twins share one answer", max_tokens=6),
        chat_request("dice-b", "Roll the dice", max_tokens=6, temperature=1.0),
    ]
    return rows


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, prefect_server, tiny_job):
    from nightshift.flows.run import run_job

    root = tmp_path_factory.mktemp("mixed")
    path = write_jsonl(root / "in.jsonl", mixed_batch())
    report = run_job(str(path), str(root / "run"), tiny_job, shard_size=10)
    return path, root / "run", report


def outcome_by_id(run_dir):
    outputs = {row["custom_id"]: row for row in read_jsonl(run_dir / "output.jsonl")}
    errors = read_jsonl(run_dir / "errors.jsonl")
    return outputs, errors


def test_every_input_line_is_in_outputs_or_errors_exactly_once_in_input_order(mixed_run):
    path, run_dir, report = mixed_run
    lines = path.read_bytes().splitlines()
    outputs = read_jsonl(run_dir / "output.jsonl")
    errors = read_jsonl(run_dir / "errors.jsonl")
    assert report.complete and report.total_rows == len(lines) == len(outputs) + len(errors)
    error_lines = [e["error"]["line"] for e in errors]
    assert error_lines == sorted(error_lines) and len(set(error_lines)) == len(error_lines)
    expected_ok = [json.loads(line)["custom_id"] for n, line in enumerate(lines, 1) if n not in error_lines]
    assert [o["custom_id"] for o in outputs] == expected_ok


def test_bad_rows_get_an_openai_style_error_with_a_code_and_their_line(mixed_run):
    _, run_dir, report = mixed_run
    _, errors = outcome_by_id(run_dir)
    by_code = {e["error"]["code"]: e for e in errors}
    assert set(by_code) == {
        "invalid_json",
        "duplicate_custom_id",
        "model_not_found",
        "unsupported_parameter",
        "context_length_exceeded",
        "invalid_request",
        "invalid_encoding",
        "missing_custom_id",
        "unsupported_method",
        "unsupported_url",
        "missing_messages",
        "missing_prompt",
        "invalid_custom_id",
        "empty_prompt",
    }
    kinds_of_bad_line = 20  # 20 kinds of bad line, reported under 14 codes
    assert sum(report.errors_by_code.values()) == len(errors) == kinds_of_bad_line
    by_id = {e["custom_id"]: e["error"]["code"] for e in errors}
    assert by_id["huge-max-tokens"] == "context_length_exceeded" and by_id["zero-max-tokens"] == "invalid_request"
    assert by_id["no-body"] == "invalid_request" and by_id[None] in {
        "invalid_encoding",
        "invalid_json",
        "invalid_request",
        "missing_custom_id",
        "invalid_custom_id",
    }
    assert by_code["invalid_json"]["error"]["line"] == 4
    assert "gpt-4o-mini" in by_code["model_not_found"]["error"]["message"]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)


def test_outputs_follow_the_openai_batch_output_format(mixed_run):
    _, run_dir, _ = mixed_run
    outputs, _ = outcome_by_id(run_dir)
    row = outputs["plain-0"]
    assert row["error"] is None and row["id"].startswith("batch_req_")
    response = row["response"]
    assert response["status_code"] == 200
    body = response["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8  # max_tokens with a random model: finish by length
    assert choice["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    assert outputs["completion"]["response"]["body"]["choices"][0]["text"]


def test_a_responses_row_is_answered_as_a_response_object_with_its_chat_twins_words(mixed_run):
    """A /v1/responses line asks plain-0's question: the official client's Response model reads its
    body, and its text is the greedy chat answer's, token for token."""
    from openai.types.responses import Response

    _, run_dir, _ = mixed_run
    outputs, errors = outcome_by_id(run_dir)
    response = Response.model_validate(outputs["responses"]["response"]["body"])
    chat = outputs["plain-0"]["response"]["body"]
    assert response.object == "response" and response.model == "tiny"
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"]
    )  # fmt: skip
    [refused] = [e for e in errors if e["custom_id"] == "responses-web-search"]
    assert refused["error"]["code"] == "unsupported_parameter" and "web_search" in refused["error"]["message"]


def test_sampling_fields_are_honoured(mixed_run):
    _, run_dir, _ = mixed_run
    outputs, _ = outcome_by_id(run_dir)
    structured = outputs["structured"]["response"]["body"]["choices"][0]
    if structured["finish_reason"] == "stop":
        assert json.loads(structured["message"]["content"])["label"] in {"invoice", "contract", "review"}
    else:  # a random model may spend its tokens on the whitespace JSON allows; what it wrote must still fit
        compact = "".join(structured["message"]["content"].split())
        assert any(f'{{"label":"{v}"}}'.startswith(compact) for v in ("invoice", "contract", "review"))
        assert compact.startswith('{"')
    logprobs = outputs["logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(logprobs) == 8 and all(len(t["top_logprobs"]) >= 2 for t in logprobs)
    assert len(outputs["two-choices"]["response"]["body"]["choices"]) == 2
    stopped = outputs["stopped"]["response"]["body"]
    assert "e" not in stopped["choices"][0]["message"]["content"]
    assert stopped["usage"]["completion_tokens"] <= 6


def test_results_parquet_has_one_row_per_input_row(mixed_run):
    path, run_dir, report = mixed_run
    table = pq.read_table(run_dir / "results.parquet")
    assert table.num_rows == report.total_rows
    assert table.column_names == [
        "custom_id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "shard",
        "source",
        "model",  # the row's LoRA adapter (null: the base model)
        "image_tokens",  # of its prompt tokens, those its images became
    ]
    assert sum(v or 0 for v in table["completion_tokens"].to_pylist()) == report.completion_tokens


def test_identical_greedy_rows_are_generated_once_and_each_keeps_its_own_line(mixed_run):
    _, run_dir, _ = mixed_run
    outputs, _ = outcome_by_id(run_dir)
    sources = dict(
        zip(*pq.read_table(run_dir / "results.parquet", columns=["custom_id", "source"]).to_pydict().values())
    )
    twin_a, twin_b = (outputs[t]["response"]["body"] for t in ("twin-a", "twin-b"))
    assert twin_a["choices"] == twin_b["choices"] and twin_a["usage"] == twin_b["usage"]
    assert outputs["twin-a"]["id"] != outputs["twin-b"]["id"] and twin_a["id"] != twin_b["id"]
    assert sorted([sources["twin-a"], sources["twin-b"]]) == ["duplicate", "engine"]
    # sampled without a seed: the same request may rightly answer differently, so both are generated
    assert sources["dice-a"] == sources["dice-b"] == "engine"
    report = json.loads((run_dir / "report.json").read_text())
    saved = report["served_without_generating"]
    assert saved["rows"] == list(sources.values()).count("duplicate") == 1
    assert saved["tokens"] == twin_b["usage"]["total_tokens"] and saved["cost_saved_on_demand"] > 0


def test_a_second_run_on_the_same_directory_is_cached_and_duplicates_nothing(mixed_run, tiny_job):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from nightshift.flows.batch import batch_inference

    path, run_dir, report = mixed_run
    before = (run_dir / "output.jsonl").read_text()
    state = batch_inference(input_path=str(path), run_dir=str(run_dir), job=tiny_job, shard_size=10, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    generate_states = [t.state.name for t in task_runs if t.name.startswith("generate-shard")]
    assert generate_states and set(generate_states) == {"Cached"}
    after = (run_dir / "output.jsonl").read_text()
    assert [json.loads(line)["custom_id"] for line in after.splitlines()] == [
        json.loads(line)["custom_id"] for line in before.splitlines()
    ]


def test_the_cost_report_totals_equal_the_usage_in_output_jsonl(mixed_run):
    _, run_dir, _ = mixed_run
    report = json.loads((run_dir / "report.json").read_text())
    usage = [row["response"]["body"]["usage"] for row in read_jsonl(run_dir / "output.jsonl")]
    # a chat or completions line's usage, or a Response's (input_tokens, output_tokens)
    assert report["prompt_tokens"] == sum(u.get("prompt_tokens", u.get("input_tokens")) for u in usage)
    assert report["completion_tokens"] == sum(u.get("completion_tokens", u.get("output_tokens")) for u in usage)
    assert report["rows"] == len(usage) + len(read_jsonl(run_dir / "errors.jsonl"))
    assert (run_dir / "report.md").read_text().startswith("# Nightshift run report")
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_per_million_tokens_is_the_pricing_blocks_arithmetic(mixed_run):
    from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
    from nightshift.report import build_report
    from nightshift.runtime.rundir import RunDir

    _, run_dir, _ = mixed_run
    pricing = GpuPricing(accelerator="H100", accelerators=8, on_demand_per_hour=4.0, spot_per_hour=1.5)
    report = build_report(RunDir(run_dir), pricing, ManagedApiPrices())
    hours = report.generate_seconds / 3600
    tokens = report.prompt_tokens + report.completion_tokens
    assert report.cost_per_million_tokens == pytest.approx(hours * 8 * 4.0 / (tokens / 1e6), rel=1e-3)
    assert report.cost_per_million_tokens_spot == pytest.approx(hours * 8 * 1.5 / (tokens / 1e6), rel=1e-3)
    assert report.cost_per_million_output_tokens == pytest.approx(
        hours * 8 * 4.0 / (report.completion_tokens / 1e6), rel=1e-3
    )


def test_without_a_gpu_the_report_says_so_and_gpu_fields_are_null(mixed_run):
    _, run_dir, _ = mixed_run
    report = json.loads((run_dir / "report.json").read_text())
    for key in (
        "rows",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_second",
        "output_tokens_per_second",
        "cost_per_million_tokens",
        "gpu_utilization_mean",
    ):
        assert key in report
    assert report["tokens_per_second"] > 0
    if report["gpu_count"] == 0:  # this machine: no NVML
        assert report["gpu_utilization_mean"] is None and report["gpu_name"] is None
        assert "no NVML" in report["gpu_telemetry"]
        assert "no GPU telemetry" in (run_dir / "report.md").read_text()


def test_report_cli_prints_json_figures_and_the_trend_over_runs(mixed_run, capsys):
    from nightshift.cli import main

    _, run_dir, _ = mixed_run
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["rows"] == json.loads((run_dir / "run.json").read_text())["total_rows"]
    assert figures["validated"] is True  # the canary stage's verdict is part of the report
    assert main(["report", "--all", str(run_dir.parent), "--format", "json"]) == 0
    trend = json.loads(capsys.readouterr().out)
    assert [row["run_dir"] for row in trend] == [str(run_dir)]
    assert "## Validation" in (run_dir / "report.md").read_text()
