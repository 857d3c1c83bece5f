"""Merge stage (`merge-outputs`, `expire-unfinished`): thin Prefect tasks over nightshift/stages/merge.py,
which makes the shards' chunk files the run's outputs, in input order."""

from __future__ import annotations

from prefect import task

from nightshift.observe.assets import record_outputs
from nightshift.records import Plan, RunReport, ShardResult
from nightshift.runtime.deadline import EXPIRED_CODE
from nightshift.runtime.rundir import RunDir
from nightshift.stages.merge import merge, merge_unfinished


@task(name="merge-outputs")
def merge_outputs(plan: Plan, results: list[ShardResult], run_dir: str) -> RunReport:
    """The flow runs it as the materializing task of the run's output assets (nightshift/observe/assets.py)."""
    report = _told(merge(plan, results, RunDir(run_dir)))
    record_outputs(report)
    return report


def _told(report: RunReport) -> RunReport:
    from prefect import get_run_logger

    errors = ", ".join(f"{code}={n}" for code, n in report.errors_by_code.items())
    get_run_logger().info(
        "merged %d rows: %d in output.jsonl, %d in errors.jsonl%s; %d prompt + %d completion tokens",
        report.total_rows,
        report.succeeded,
        report.failed,
        f" ({errors})" if errors else "",
        report.prompt_tokens,
        report.completion_tokens,
    )
    return report


@task(name="expire-unfinished")
def expire_unfinished(run_dir: str, deadline: str) -> RunReport:
    """Close a run whose deadline passed: finished rows merged, every other row a
    `batch_expired` error line (retryable with `nightshift retry`)."""
    rd = RunDir(run_dir)
    report = merge_unfinished(rd, EXPIRED_CODE, f"the run's deadline ({deadline}) passed before this row was generated")
    report = report.model_copy(update={"expired": True})
    report.save(rd.summary)
    return _told(report)
