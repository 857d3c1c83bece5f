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


def test_sampled_seeded_and_greedy_rows_each_meet_a_check_and_the_settings_gate_passes_on_the_runs_engine(tmp_path):
    """Issue 50: a row sampled with a seed is asked again (the same text), one sampled without a
    seed is scored for plausibility against the reference, greedy rows by the oracle — and the
    run's tokens scored again, one row per step, agree with the run's batched ones."""
    rows = [completion(f"g-{i}", f"Once upon a time, in village number {i},", max_tokens=8) for i in range(3)]
    rows += [chat_request(f"seeded-{i}", f"Tell me about {i}.", temperature=0.9, seed=i) for i in range(2)]
    rows += [chat_request(f"free-{i}", f"Write about {i}.", temperature=0.8, max_tokens=12) for i in range(3)]
    done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model", "tiny",
                   "--oracle-samples", "6", "--determinism-samples", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = verdict_of(tmp_path / "run")
    assert verdict["state"] == "validated", verdict
    oracle = {r["custom_id"]: r for r in verdict["checks"]["oracle"]["results"]}
    assert {f"free-{i}" for i in range(3)} <= set(oracle) and {f"g-{i}" for i in range(3)} <= set(oracle)
    assert all(oracle[f"free-{i}"]["scored_as"] == "sampled at temperature 0.8" for i in range(3))
    assert all(oracle[f"free-{i}"]["excess_surprisal"] <= 2.0 for i in range(3))
    reasked = {r["custom_id"]: r["same"] for r in verdict["checks"]["determinism"]["results"]}
    assert {"seeded-0", "seeded-1"} <= set(reasked) and all(reasked.values())
    assert not any(custom_id.startswith("free-") for custom_id in reasked)  # no seed: nothing to compare
    gate = verdict["checks"]["settings_gate"]
    assert gate["contrast"].startswith("one row per step") and gate["agreement"] == 1.0 and gate["seconds"] > 0
    assert {r["custom_id"] for r in gate["results"]} <= {f"g-{i}" for i in range(3)} and len(gate["results"]) == 3


def test_another_models_weights_as_the_reference_and_a_planted_change_of_numerics_each_fail_the_run_named(tmp_path):
    """`--oracle-model` of a different model: its tokens, greedy or sampled, are not the run's
    (failed, the rows named, exit 3); a contrast the operator names starts an engine with it,
    and one that changes the numerics (a planted normalisation epsilon) fails the gate, naming
    the setting — where the default contrast passed (above)."""
    rows = [completion(f"g-{i}", f"Once upon a time, in village number {i},", max_tokens=8) for i in range(2)]
    rows += [chat_request(f"free-{i}", f"Write about {i}.", temperature=0.8, max_tokens=12) for i in range(2)]
    done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model", "tiny",
                   "--oracle-model", "smollm2", "--settings-gate", PLANTED,
                   "--oracle-samples", "4")  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    verdict = verdict_of(tmp_path / "run")
    failed = {failure.split(" ")[0]: failure for failure in verdict["failures"]}
    assert verdict["state"] == "failed" and set(failed) == {"oracle", "settings"}
    oracle = {r["custom_id"]: r for r in verdict["checks"]["oracle"]["results"]}
    assert not any(r["agrees"] for r in oracle.values()) and set(oracle) == {"g-0", "g-1", "free-0", "free-1"}
    assert all(oracle[f"free-{i}"]["excess_surprisal"] > 2.0 for i in range(2))
    assert all(custom_id in failed["oracle"] for custom_id in oracle)
    gate = verdict["checks"]["settings_gate"]
    assert gate["contrast"] == PLANTED and gate["agreement"] < 1.0
    assert PLANTED in failed["settings"] and all(r["custom_id"] in failed["settings"] for r in gate["results"])


PLANTED = 'hf_overrides={"rms_norm_eps": 0.5}'  # each layer's RMS norm damped: the same weights, other numerics
