"""Retry flow: give the rows that failed for the engine's sake another attempt.

Only retryable errors are retried: `engine_error` (the engine died under the row twice)
and `batch_expired` (the run's deadline came before the row was generated); validation
errors would fail the same way again. Their new outcomes are added as chunks beside the old
ones and supersede them in the merged outputs.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from nightshift.blocks.storage import storage_options_of
from nightshift.config import JobSpec
from nightshift.records import Plan, RunReport
from nightshift.runtime.lease import run_lease
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import use_storage_options
from nightshift.stages.chunks import retryable_rows, shard_cache_key
from nightshift.stages.generate import finished_result
from nightshift.tasks.s3_generate import retry_shard_rows
from nightshift.tasks.s4_merge import merge_outputs


@flow(name="nightshift-retry", task_runner=ThreadPoolTaskRunner(max_workers=2))
def retry_errors(run_dir: str, storage: str | None = None) -> RunReport:
    """`storage` names the ObjectStorage block of an `s3://` run directory (default: the
    environment's credentials)."""
    if storage:
        use_storage_options(storage_options_of(storage))
    rd = RunDir(run_dir)
    with run_lease(rd):
        return _retry(rd)


def _retry(rd: RunDir) -> RunReport:
    run_dir = str(rd)  # the tasks' parameter
    plan, job = Plan.load(rd.plan_manifest), JobSpec.load(rd.job)
    retry = {shard.index: retryable_rows(rd.shard_output(shard_cache_key(shard, job))) for shard in plan.shards}
    futures = {
        shard.index: retry_shard_rows.submit(shard, job, run_dir, retry[shard.index])
        for shard in plan.shards
        if retry[shard.index]
    }
    results = [
        futures[shard.index].result() if shard.index in futures else finished_result(shard, job, rd)
        for shard in plan.shards
    ]
    return merge_outputs(plan, results, run_dir)
