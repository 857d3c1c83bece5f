"""`nightshift plan` against the real run of the same input (tiny model, real Prefect server):
the prompt tokens it counts without an engine are the ones the run reports, and the run's
report becomes the throughput history of the next plan."""

import json
import subprocess

from conftest import chat_request, write_jsonl
from harness import run_cli


def varied_rows() -> list:
    rows = [
        chat_request(f"chat-{i}", "Summarize the quarterly invoice " * (1 + i % 9), max_tokens=4 + i % 13)
        for i in range(40)
    ]
    rows += [
        {
            "custom_id": "system-and-turns",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Hi."},
                    {"role": "user", "content": "Classify: invoice or contract?"},
                ],
                "max_tokens": 6,
            },
        },
        {
            "custom_id": "content-parts",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}],
                    }
                ],
                "max_tokens": 5,
            },
        },
        {
            "custom_id": "prompt",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon", "max_tokens": 3},
        },
        {
            "custom_id": "ids",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": [5, 6, 7, 8], "max_tokens": 3},
        },
        chat_request("two", "Two answers", max_tokens=4, n=2, temperature=0.7, seed=3),
        "{broken json",
    ]
    return rows


def nightshift_plan(*args) -> subprocess.CompletedProcess:
    return run_cli("plan", *args, "--model", "tiny", "--shard-size", "16", timeout=300)


def test_the_plan_counts_the_tokens_the_run_reports_and_learns_its_speed(tmp_path, prefect_server, tiny_job):
    from nightshift.flows.run import run_job

    path = write_jsonl(tmp_path / "in.jsonl", varied_rows())
    before = nightshift_plan(path, "--format", "json", "--deadline", "1h")
    assert before.returncode == 0, before.stderr
    blind = json.loads(before.stdout)

    report = run_job(str(path), str(tmp_path / "runs" / "night-1"), tiny_job, shard_size=16)
    assert blind["tokens"]["prompt_tokens"] == report.prompt_tokens
    assert blind["tokens"]["rows"] == 46 and blind["tokens"]["valid_rows"] == 45 and blind["tokens"]["shards"] == 3
    assert blind["tokens"]["rejected_by_code"] == {"invalid_json": 1}
    assert blind["completion_tokens_estimate"] >= report.completion_tokens  # the bound holds
    assert blind["throughput"] is None and blind["gpus_needed"] is None  # unknown, not invented

    after = nightshift_plan(path, "--format", "json", "--deadline", "1h", "--history", tmp_path / "runs")
    assert after.returncode == 0, after.stderr
    learned = json.loads(after.stdout)
    measured = json.loads((tmp_path / "runs" / "night-1" / "report.json").read_text())
    assert learned["throughput"]["tokens_per_second"] == measured["tokens_per_second"]
    assert learned["throughput"]["source"] == "history: 1 earlier run of this model on cpu-2vcpu"
    total = report.prompt_tokens + learned["completion_tokens_estimate"]
    assert learned["hours_one_gpu"] == round(total / measured["tokens_per_second"] / 3600, 4)
    assert learned["gpus_needed"] == 1 and learned["finishes_in_time"]

    table = nightshift_plan(path, "--history", tmp_path / "runs")
    assert f"| prompt tokens (exact) | {report.prompt_tokens:,} |" in table.stdout


def test_a_plan_of_a_missing_input_is_one_line_and_exit_2(tmp_path):
    done = nightshift_plan(tmp_path / "nowhere.jsonl")
    assert done.returncode == 2 and done.stderr.startswith("nightshift: ") and len(done.stderr.splitlines()) == 1


def test_as_a_flow_the_plan_is_a_markdown_artifact_in_the_dashboard(tmp_path, prefect_server, tiny_job):
    from prefect.artifacts import Artifact

    from nightshift.flows.plan_night import plan_night

    path = write_jsonl(tmp_path / "in.jsonl", varied_rows())
    result = plan_night(str(path), job=tiny_job, shard_size=16, deadline="1h")
    assert result["tokens"]["valid_rows"] == 45 and result["throughput"] is None
    artifact = Artifact.get("nightshift-plan-tiny")
    assert f"| prompt tokens (exact) | {result['tokens']['prompt_tokens']:,} |" in artifact.data
    assert "GPUs to finish by the deadline | unknown (throughput unknown)" in artifact.data


def test_without_history_a_calibration_run_measures_the_throughput_and_says_so(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", varied_rows())
    done = nightshift_plan(path, "--calibrate", "12", "--deadline", "1h", "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout)
    assert measured["throughput"]["source"] == "calibration: 12 rows of this input, run just now on cpu-2vcpu"
    assert measured["throughput"]["tokens_per_second"] > 0 and measured["gpus_needed"] >= 1
