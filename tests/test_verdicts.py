"""The verdict tells the truth (docs/canaries.md): validated only when a check ran and passed;
"not validated", with the reasons, when no check applies; never an oracle scored against weights
that are not the ones answering. Runs through a recording engine server (tests/stub_engine.py):
what is checked here is the verdict, not the engine."""

from __future__ import annotations

import json

import pytest
from conftest import chat_request, write_jsonl
from harness import run_cli
from stub_engine import StubEngine


@pytest.fixture(scope="module")
def someone_elses_server():
    engine = StubEngine("someone-elses-8b")  # one model, not named like any local one
    yield engine
    engine.close()


def verdict_of(run_dir) -> dict:
    return json.loads((run_dir / "validation.json").read_text())


def completion(custom_id: str, prompt: str, **body) -> dict:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def test_a_server_of_another_model_is_not_scored_against_the_local_default_but_its_answers_are_reasked(
    tmp_path, someone_elses_server
):
    rows = [chat_request(f"q-{i}", f"Question {i}?") for i in range(6)]
    done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model", "tiny",
                   "--engine-url", someone_elses_server.url)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = verdict_of(tmp_path / "run")
    assert verdict["state"] == "validated" and verdict["validated"], verdict
    assert "someone-elses-8b" in verdict["checks"]["oracle"]["skipped"]  # not 0 % agreement against tiny
    assert verdict["checks"]["determinism"]["same"] == verdict["checks"]["determinism"]["of"] > 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["engine_settings"]["served_model"] == "someone-elses-8b"  # the mismatch is visible
    assert report["validation_state"] == "validated"


def test_a_completions_file_is_checked_too(tmp_path):
    """The oracle scores a completion's tokens on the prompt as given, and the determinism re-ask
    re-runs it, on the in-process engine: a completions file is validated by checks that ran."""
    rows = [completion(f"c-{i}", f"Once upon a time, in village number {i},") for i in range(4)]
    done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model", "tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = verdict_of(tmp_path / "run")
    assert verdict["state"] == "validated", verdict
    assert verdict["checks"]["oracle"]["agreement"] == 1.0 and len(verdict["checks"]["oracle"]["results"]) == 3
    assert verdict["checks"]["determinism"]["same"] == verdict["checks"]["determinism"]["of"] == 2


def test_rows_no_check_applies_to_end_not_validated_saying_why_and_fail_only_when_validation_is_required(
    tmp_path, someone_elses_server
):
    rows = [completion(f"c-{i}", f"Once upon a time {i}", temperature=0.8) for i in range(4)]  # sampled, no seed
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ("--model", "tiny", "--engine-url", someone_elses_server.url)
    done = run_cli("run", path, "--output", tmp_path / "run", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = verdict_of(tmp_path / "run")
    assert verdict["state"] == "not_validated" and not verdict["validated"] and not verdict["failures"]
    assert {"oracle", "determinism"} <= set(verdict["checks"]) and all(
        "skipped" in check for check in verdict["checks"].values()
    )
    assert "not validated" in done.stdout + done.stderr
    assert "Not validated: no check applied" in (tmp_path / "run" / "report.md").read_text()
    required = run_cli("run", path, "--output", tmp_path / "strict", *common, "--require-validation")
    assert required.returncode == 3, required.stderr[-3000:]
    strict = verdict_of(tmp_path / "strict")
    assert strict["state"] == "failed" and "--require-validation" in strict["failures"][0]
