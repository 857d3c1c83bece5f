"""Generate stage (`generate-shard`, `retry-shard-rows`): thin Prefect tasks over nightshift/stages/generate.py,
which answers a shard's rows on the process's engine. The task cache, keyed on the shard's hash,
is the checkpoint store."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from nightshift.config import JobSpec
from nightshift.errors import NightshiftError
from nightshift.observe import events
from nightshift.records import Shard, ShardMetrics, ShardResult
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import is_device_full
from nightshift.stages.chunks import (
    checkpoint_intact,
    shard_cache_key,
)
from nightshift.stages.generate import _story, generate


def _task_cache_key(context: TaskRunContext, parameters: dict) -> str:
    return shard_cache_key(parameters["shard"], parameters["job"])


def _retry_unless_preempted(task, task_run, state) -> bool:
    # Each of Nightshift's errors says whether a retry in this process may help (nightshift.errors):
    # not for a preempted process, a configuration the engine refuses, a passed deadline, a
    # stalled engine start or a silent engine server (the run ends, resumable). A full disk
    # stays full until someone frees it, whoever raised it.
    failure = state.result(raise_on_failure=False)
    if isinstance(failure, BaseException) and is_device_full(failure):
        return False
    return failure.retryable if isinstance(failure, NightshiftError) else True


@task(
    name="generate-shard",
    cache_key_fn=_task_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_unless_preempted,
)
def generate_shard(shard: Shard, job: JobSpec, run_dir: str) -> ShardResult:
    rd = RunDir(run_dir)
    result = _told(generate(shard, job, rd))
    events.emit(
        events.SHARD_COMPLETED,
        rd,
        job,
        run_figures_too=False,
        shard=result.shard_index,
        shard_rows=result.rows,
        shard_succeeded=result.succeeded,
        shard_failed=result.failed,
        shard_tokens=result.prompt_tokens + result.completion_tokens,
        generated_rows=result.regenerated_rows,
        seconds=result.wall_seconds,
    )
    return result


@task(name="retry-shard-rows", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_unless_preempted)
def retry_shard_rows(shard: Shard, job: JobSpec, run_dir: str, rows: set[int]) -> ShardResult:
    return _told(generate(shard, job, RunDir(run_dir), only_rows=rows))


def _told(result: ShardResult) -> ShardResult:
    """The shard's line in the run's log: rows, outcomes by code, what this attempt generated."""
    try:
        metrics = ShardMetrics.load(RunDir.shard_metrics(Path(result.output_dir)))
        errors, rate = ", ".join(f"{code}={n}" for code, n in metrics.errors_by_code.items()), metrics.tokens_per_second
    except (OSError, ValueError):
        errors, rate = "", None
    _story().info(
        "shard %d: %d rows, %d ok, %d failed%s; %d generated in this attempt%s",
        result.shard_index,
        result.rows,
        result.succeeded,
        result.failed,
        f" ({errors})" if errors else "",
        result.regenerated_rows,
        f" at {rate:,.0f} tokens/s" if rate else " (the rest were on disk)",
    )
    return result


def generate_here(
    shards: list[Shard], job: JobSpec, run_dir: str, checkpoint_storage: str
) -> tuple[list[ShardResult], int]:
    """Submit one cached generate task per shard in the current flow; returns the results in
    shard order and how many came back from the cache untouched.

    The task cache lives in the saved filesystem block `checkpoint_storage`. A cache hit whose
    files were deleted or changed is regenerated, not trusted.
    """
    task_ = generate_shard.with_options(result_storage=checkpoint_storage)
    futures = [task_.submit(shard, job, run_dir) for shard in shards]
    for future in futures:  # all of them: a run closed at its deadline must have no writer left
        future.wait()
    results = [future.result() for future in futures]
    cached = sum(future.state.name == "Cached" for future in futures)
    _story().info("%d shards: %d generated, %d from checkpoints (cached)", len(shards), len(shards) - cached, cached)
    stale = [shard for shard, result in zip(shards, results) if not checkpoint_intact(result)]
    if stale:
        regenerate = task_.with_options(refresh_cache=True)
        redone = {shard.index: regenerate.submit(shard, job, run_dir) for shard in stale}
        results = [redone[r.shard_index].result() if r.shard_index in redone else r for r in results]
        cached -= len(stale)
    return results, cached
