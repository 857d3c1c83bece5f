"""Plan stage (`plan-shards`): a thin Prefect task over nightshift/stages/plan.py, which cuts the input into
content-hashed shards."""

from __future__ import annotations

from prefect import get_run_logger, task

from nightshift.config import DEFAULT_SHARD_SIZE, CorpusOptions
from nightshift.records import Plan
from nightshift.runtime.rundir import RunDir
from nightshift.stages.canaries import load_canaries
from nightshift.stages.plan import layout_message, plan


@task(name="plan-shards")
def plan_shards(
    input_path: str,
    run_dir: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    corpus: CorpusOptions | None = None,
    canary_file: str | None = None,
    group_prefixes: bool = True,
) -> Plan:
    """An `s3://` input is read with this process's credentials (nightshift.runtime.storage): the
    environment's, or the ObjectStorage block the flow loaded. None travels as a parameter."""
    canaries = [row for row, _ in load_canaries(canary_file)] if canary_file else None
    planned = plan(input_path, RunDir(run_dir), shard_size, corpus, canaries, group_prefixes=group_prefixes)
    rejected = ", ".join(f"{code}={n}" for code, n in planned.rejected_by_code.items()) or "none"
    logger = get_run_logger()
    logger.info(
        "planned %d shards of %d rows (%d canaries; rejected at planning: %s)",
        len(planned.shards),
        planned.total_rows - planned.canary_rows,
        planned.canary_rows,
        rejected,
    )
    if planned.layout == "prefix-groups":
        logger.info("prompt layout: %s", layout_message(planned))
    if planned.misplaced_shared_text is not None:
        logger.warning("prompt layout: %s", planned.misplaced_shared_text.message())
    return planned
