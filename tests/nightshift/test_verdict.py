"""Specification of `validation.json` as a record: what the canary stage writes, its readers
(the report, the Batch API, the CLI) load typed, in the shape the docs describe."""

import json

import pytest
from pydantic import ValidationError

from nightshift.records import DeterminismCheck, OracleCheck, SettingsGateCheck, SkippedCheck, Verdict

pytestmark = pytest.mark.fast

WRITTEN = {  # as a run that checked everything wrote it
    "validated": False,
    "state": "failed",
    "checks": {
        "canaries": {
            "pass_rate": 0.5,
            "min_pass_rate": 1.0,
            "results": [
                {"canary": "capital", "passed": True, "problems": [], "text": "Paris"},
                {"canary": "json", "passed": False, "problems": ["not JSON"], "text": None},
            ],
        },
        "oracle": {
            "agreement": 1.0,
            "min_agreement": 0.9,
            "reference": "tiny",
            "adapter_references": {"support": "/adapters/support"},
            "tokens": 16,
            "top_k": 5,
            "logprob_tolerance": 2.0,
            "results": [
                {"custom_id": "r-1", "agrees": True, "tokens": 8, "worst_rank": 0, "worst_gap": 0.0,
                 "scored_as": "greedy", "excess_surprisal": None,
                 "reference_on": "cpu float32", "ours": "hello", "adapter": "support"},
                {"custom_id": "r-2", "agrees": True, "tokens": 16, "worst_rank": 312, "worst_gap": 6.1,
                 "scored_as": "sampled at temperature 0.8", "excess_surprisal": -0.21,
                 "reference_on": "cpu float32", "ours": "Once", "adapter": None},
            ],
            "memory": None,
        },
        "embedding_oracle": {
            "min_cosine": 0.9999,
            "required": 0.999,
            "reference": "minilm",
            "results": [{"custom_id": "d-1", "cosine": 0.9999, "truncated": False}],
        },
        "determinism": {"same": 1, "of": 1, "results": [{"custom_id": "r-1", "same": True}]},
        "settings_gate": {
            "contrast": "one row per step (the run: up to 256 rows per step)",
            "agreement": 1.0,
            "min_agreement": 1.0,
            "tokens": 16,
            "top_k": 5,
            "logprob_tolerance": 2.0,
            "seconds": 0.4,
            "results": [{"custom_id": "r-1", "agrees": True, "tokens": 8, "worst_rank": 1, "worst_gap": 0.02}],
        },
    },
    "failures": ["canaries passed 50% < 100%: json (not JSON)"],
    "seconds": 3.2,
    "where": {"host": "gpu-7", "pid": 41, "worker_pid": 40, "cuda_visible_devices": "1", "flow_run_id": None},
}  # fmt: skip


def test_a_verdict_loads_typed_and_writes_back_the_same_json(tmp_path):
    (tmp_path / "validation.json").write_text(json.dumps(WRITTEN))
    verdict = Verdict.load(tmp_path / "validation.json")

    assert isinstance(verdict.checks["oracle"], OracleCheck) and verdict.checks["oracle"].results[0].agrees
    assert isinstance(verdict.checks["determinism"], DeterminismCheck) and verdict.checks["determinism"].of == 1
    assert isinstance(verdict.checks["settings_gate"], SettingsGateCheck)
    verdict.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == WRITTEN


def test_a_skipped_check_says_why_and_has_no_figures():
    verdict = Verdict(validated=True, checks={"oracle": SkippedCheck(skipped="no greedy row")}, failures=[])
    assert verdict.summaries() == {"oracle": {"skipped": "no greedy row"}}


def test_summaries_leave_the_per_row_results_out():
    summaries = Verdict.model_validate(WRITTEN).summaries()
    assert summaries["determinism"] == {"same": 1, "of": 1}
    assert "results" not in summaries["canaries"] and summaries["canaries"]["pass_rate"] == 0.5


def test_a_check_with_a_misspelt_figure_is_refused():
    broken = {**WRITTEN, "checks": {"determinism": {"same": 1, "off": 1, "results": []}}}
    with pytest.raises(ValidationError):
        Verdict.model_validate(broken)


def test_a_verdict_with_no_check_that_ran_is_not_validated_and_says_why():
    skipped = Verdict(
        validated=False, state="not_validated", failures=[],
        checks={"oracle": SkippedCheck(skipped="no greedy chat row"), "determinism": SkippedCheck(skipped="same")},
    )  # fmt: skip
    assert skipped.verdict == "not_validated" and skipped.said().startswith("not validated (oracle: no greedy chat row")
    older = Verdict(validated=True, checks={}, failures=[])  # written before verdicts had states
    assert older.verdict == "validated" and Verdict.model_validate(WRITTEN).said() == "FAILED"
