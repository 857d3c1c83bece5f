"""The main flow: plan-shards → generate (one task per shard) → merge-outputs →
canary-validation → cost-report."""

from __future__ import annotations

import dataclasses
import hashlib

from prefect import flow
from prefect.filesystems import LocalFileSystem
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.pricing import GpuPricing
from nightshift import progress
from nightshift.canaries import CanaryConfig
from nightshift.inputs import CorpusOptions
from nightshift.records import JobSpec, RunReport
from nightshift.rundir import RunDir
from nightshift.status import run_status
from tasks.canary import canary_validation
from tasks.generate import checkpoint_intact, generate_shard
from tasks.merge import merge_outputs
from tasks.plan import plan_shards
from tasks.report import cost_report


# Two shards in flight: while one shard's last rows decode, the next one's rows already
# fill the engine's batch. More would only spread checkpoints thinner.
@flow(name="nightshift-batch", task_runner=ThreadPoolTaskRunner(max_workers=2))
def batch_inference(
    input_path: str,
    run_dir: str,
    job: JobSpec,
    shard_size: int = 10_000,
    corpus: CorpusOptions | None = None,
    checkpoint_storage: str | None = None,
    pricing: str | None = None,
    validation: CanaryConfig | None = None,
) -> RunReport:
    """Run `job` over every row of `input_path`; outputs land in `run_dir`.

    `checkpoint_storage` names a saved Prefect filesystem block ("local-file-system/x",
    "s3-bucket/y") holding the task cache; by default it is `run_dir/checkpoints`.
    `pricing` names a saved GpuPricing block for the cost report (default: its defaults).
    `validation` configures the canary stage (default: oracle and determinism checks).
    """
    validation = validation or CanaryConfig()
    job.save(RunDir(run_dir).job)
    plan = plan_shards(input_path, run_dir, shard_size, corpus, validation.canaries)
    progress.start(RunDir(run_dir), plan.total_rows, run_status(run_dir).rows_done)
    generate = generate_shard.with_options(result_storage=checkpoint_storage or _local_checkpoints(run_dir))
    futures = [generate.submit(shard, job, run_dir) for shard in plan.shards]
    results = [future.result() for future in futures]
    cached = sum(future.state.name == "Cached" for future in futures)
    # A cache hit whose files were deleted or changed is regenerated, not trusted.
    stale = [shard for shard, result in zip(plan.shards, results) if not checkpoint_intact(result)]
    if stale:
        regenerate = generate.with_options(refresh_cache=True)
        redone = {shard.index: regenerate.submit(shard, job, run_dir) for shard in stale}
        results = [redone[r.shard_index].result() if r.shard_index in redone else r for r in results]
        cached -= len(stale)
    report = merge_outputs(plan, results, run_dir)
    try:
        canary_validation(run_dir, job, validation)
    finally:  # a failed validation still gets its cost report, verdict included
        cost_report(run_dir, GpuPricing.load(pricing) if pricing else None)
    return dataclasses.replace(report, shards=len(plan.shards), shards_cached=cached)


def _local_checkpoints(run_dir: str) -> str:
    # Prefect wants result storage saved server-side; one block per run directory.
    path = str(RunDir(run_dir).checkpoints)
    name = "nightshift-ckpt-" + hashlib.sha256(path.encode()).hexdigest()[:16]
    LocalFileSystem(basepath=path).save(name, overwrite=True)
    return f"local-file-system/{name}"
