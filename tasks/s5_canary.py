"""Canary stage (`canary-validation`): a thin Prefect task over nightshift/validation/gate.py, which
checks a run before it is called done."""

from __future__ import annotations

import json

from prefect import get_run_logger, task

from nightshift.config import CanaryConfig, JobSpec
from nightshift.records import (
    Verdict,
)
from nightshift.runtime.rundir import RunDir
from nightshift.stages.canaries import CanaryFailure
from nightshift.validation.gate import validate


@task(name="canary-validation")
def canary_validation(run_dir: str, job: JobSpec, config: CanaryConfig, validated_by: str | None = None) -> Verdict:
    """Gate the flow run on the verdict: validate here, or read the verdict that the flow run
    `validated_by` (the checks run on the GPU pool, where the engine is) left in the run directory."""
    from prefect.artifacts import create_markdown_artifact

    rd = RunDir(run_dir)
    verdict = validated_verdict(rd, validated_by) if validated_by else validate(rd, job, config)
    verdict.save(rd.validation)
    lines = [f"# Canary validation: {verdict.said()}", ""]
    lines += [f"- {failure}" for failure in verdict.failures]
    lines += [f"- {name}: {json.dumps(summary)}" for name, summary in verdict.summaries().items()]
    create_markdown_artifact(markdown="\n".join(lines), description="Nightshift canary validation")
    checks = "; ".join(
        f"{name} {json.dumps(summary)}" for name, summary in verdict.summaries(("results", "reference")).items()
    )
    get_run_logger().info(
        "validation %s (%s)%s",
        verdict.said(),
        checks,
        "".join(f"\n  - {failure}" for failure in verdict.failures),
    )
    if verdict.verdict == "not_validated":
        from nightshift.observe import events

        events.emit(events.VALIDATION_SKIPPED, rd, job, reasons=verdict.skipped_reasons)
    if verdict.verdict == "failed":
        raise CanaryFailure(
            "validation failed — outputs are on disk but NOT validated: " + " | ".join(verdict.failures)
        )
    return verdict


def validated_verdict(run_dir: RunDir, flow_run_id: str) -> Verdict:
    """The verdict the validation run `flow_run_id` left under its own name: another run's — an
    earlier night's, or a duplicate's that was taken for lost and finished after all — is not it."""
    path = run_dir.validation_verdict(flow_run_id)
    try:
        return Verdict.load(path)
    except FileNotFoundError:
        raise RuntimeError(f"the validation run {flow_run_id} left no verdict at {path}") from None
