"""The main flow: plan-shards → generate (one task per shard, here or fanned out to a GPU
work pool) → merge-outputs → canary-validation → cost-report."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from nightshift.blocks.checkpoints import saved_run_checkpoints
from nightshift.blocks.model import ModelConfig
from nightshift.blocks.pricing import GpuPricing
from nightshift.blocks.storage import storage_options_of
from nightshift.config import DEFAULT_SHARD_SIZE, CanaryConfig, CorpusOptions, FanOut, JobSpec
from nightshift.engine.local import start_engine_in_background
from nightshift.errors import DeadlineReached
from nightshift.fleet.fan_out import check_deployments
from nightshift.jobs import check_job, size_for_input
from nightshift.observe import assets, events
from nightshift.observe.status import run_status
from nightshift.records import RunReport
from nightshift.runtime import progress
from nightshift.runtime.deadline import DeadlineTimer, parse_deadline
from nightshift.runtime.lease import run_lease
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import is_url, use_storage_options
from nightshift.tasks.s1_plan_shards import plan_shards
from nightshift.tasks.s2_fan_out import dispatch_shard_groups, validate_on_pool
from nightshift.tasks.s3_generate import generate_here
from nightshift.tasks.s4_merge import expire_unfinished, merge_outputs
from nightshift.tasks.s5_canary import CanaryFailure, canary_validation
from nightshift.tasks.s6_report import cost_report


# Two shards in flight: while one shard's last rows decode, the next one's rows already
# fill the engine's batch. More would only spread checkpoints thinner.
@flow(name="nightshift-batch", task_runner=ThreadPoolTaskRunner(max_workers=2))
def batch_inference(
    input_path: str,
    run_dir: str,
    job: JobSpec | None = None,
    model: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    corpus: CorpusOptions | None = None,
    storage: str | None = None,
    checkpoint_storage: str | None = None,
    pricing: str | None = None,
    validation: CanaryConfig | None = None,
    fan_out: FanOut | None = None,
    result_cache: str | None = None,
    deadline: str | None = None,
) -> RunReport:
    """Run a model over every row of `input_path`; outputs land in `run_dir`.

    The model is `job`, or the ModelConfig block named `model` (a deployment names blocks).
    `run_dir` may hold `{date}`: the flow run's scheduled date, so each night writes its own
    directory and a retried night resumes its own.
    `run_dir` is a local directory or an object-store URL (`s3://bucket/runs/{date}`).
    `storage` names an ObjectStorage block (or a prefect-aws one as TYPE/NAME: `aws-credentials/prod`,
    `s3-bucket/lake`) with the credentials of `s3://` inputs and run
    directories (default: the environment's or the machine role's).
    `checkpoint_storage` names a saved Prefect filesystem block ("local-file-system/x",
    "s3-bucket/y") holding the task cache; by default it is `run_dir/checkpoints`.
    `pricing` names a saved GpuPricing block for the cost report (default: its defaults).
    `validation` configures the canary stage (default: oracle and determinism checks).
    `fan_out` sends shard groups to a GPU work pool's deployment; without it every shard is
    generated in this process.
    `result_cache` names a directory of deterministic rows' outputs shared across runs: rows
    answered there are not generated again.
    `deadline` ("6h", "08:00", "2026-11-27T08:00+01:00"; see nightshift/runtime/deadline.py) is kept:
    at it, admission stops, finished rows are merged and every other row becomes a
    `batch_expired` error line; the flow run ends Completed, named "Expired".
    """

    deadline_at = parse_deadline(deadline) if deadline else None  # a bad one fails before any work

    if storage:  # in this process's memory only: never a parameter, a file or a log line
        use_storage_options(storage_options_of(storage))
    job = size_for_input(job or ModelConfig.job_named(model), input_path, corpus)
    if result_cache:
        job = job.model_copy(update={"result_cache": result_cache})
    rd = RunDir(scheduled_run_dir(run_dir))
    try:
        ending = _run(input_path, rd, job, shard_size, corpus, checkpoint_storage, pricing, validation,
                      fan_out, storage, deadline_at)  # fmt: skip
    except CanaryFailure as failure:
        events.emit(events.VALIDATION_FAILED, rd, job, error=str(failure)[:2000])
        events.emit(events.RUN_FAILED, rd, job, error=str(failure)[:2000])
        raise
    except BaseException as failure:
        events.emit(events.RUN_FAILED, rd, job, error=f"{type(failure).__name__}: {failure}"[:2000])
        raise
    events.emit(events.RUN_EXPIRED if isinstance(ending, State) else events.RUN_COMPLETED, rd, job)
    return ending


def _run(input_path, rd: RunDir, job, shard_size, corpus, checkpoint_storage, pricing, validation, fan_out, storage,
         deadline_at):  # fmt: skip
    from prefect.runtime import flow_run

    run_dir = str(rd)  # the tasks' parameter: a path or URL, as Prefect records it
    with run_lease(rd, flow_run.id), DeadlineTimer(deadline_at):  # one live run per run directory
        if fan_out:
            check_deployments(fan_out)
        else:  # the engine loads here, while the input is planned
            check_job(job)
            start_engine_in_background(job.engine)
        validation = validation or CanaryConfig()
        job.save(rd.job)
        plan = plan_shards(
            input_path, run_dir, shard_size, corpus, validation.canaries, group_prefixes=job.regroup_shards
        )
        progress.start(rd, plan.total_rows, run_status(rd).rows_done)
        checkpoints = checkpoint_storage or saved_run_checkpoints(str(rd.checkpoints))
        try:
            if fan_out:
                results, cached = dispatch_shard_groups(
                    plan.shards, job, run_dir, checkpoints, fan_out, storage, deadline_at
                )
            else:
                results, cached = generate_here(plan.shards, job, run_dir, checkpoints)
        except DeadlineReached:
            return _expired(run_dir, plan, deadline_at, pricing)
        # the lineage the dashboard shows: input → outputs (the merge) → report
        outputs = assets.output_assets(rd, embedded=corpus is not None and corpus.task == "embed")
        report = assets.materializing(merge_outputs, outputs, [assets.input_asset(input_path)])(plan, results, run_dir)
        try:
            # fanned out, the checks run where the engines are: this process may hold neither
            on_pool = fan_out and fan_out.validation_deployment
            validated_by = validate_on_pool(run_dir, job, validation, fan_out, storage) if on_pool else None
            canary_validation(run_dir, job, validation, validated_by)
        finally:  # a failed validation still gets its cost report, verdict included
            reporting = assets.materializing(cost_report, [assets.report_asset(rd)], outputs)
            reporting(run_dir, GpuPricing.load(pricing) if pricing else None)
    return report.model_copy(update={"shards": len(plan.shards), "shards_cached": cached})


def _expired(run_dir: str, plan, deadline_at: datetime, pricing: str | None):
    """The run closed at its deadline: finished rows merged, the others `batch_expired`, the
    cost report says how far it got; the flow run ends Completed, named "Expired"."""
    from prefect.states import Completed

    at = deadline_at.isoformat(timespec="seconds")
    report = expire_unfinished(run_dir, at)
    cost_report(run_dir, GpuPricing.load(pricing) if pricing else None)
    report = report.model_copy(update={"shards": len(plan.shards)})
    expired = report.errors_by_code.get("batch_expired", 0)
    return Completed(
        name="Expired",
        message=f"deadline {at} reached: {report.succeeded} of {report.total_rows} rows done, {expired} batch_expired",
        data=report,
    )


def scheduled_run_dir(run_dir: str) -> str:
    """Absolute (workers share it), with `{date}` filled from the flow run's scheduled start."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    run_dir = run_dir.replace("{date}", when.strftime("%Y-%m-%d"))
    return run_dir.rstrip("/") if is_url(run_dir) else str(Path(run_dir).resolve())
