"""The `nightshift-plan` flow: `nightshift plan` as a flow run, for the dashboard and CI —
plan-shards into a scratch directory → estimate-night (a markdown artifact). No engine loads."""

from __future__ import annotations

import shutil
import tempfile

from prefect import flow

from nightshift.blocks.model import ModelConfig
from nightshift.blocks.pricing import GpuPricing
from nightshift.config import DEFAULT_SHARD_SIZE, CorpusOptions, JobSpec
from nightshift.runtime.deadline import parse_deadline
from nightshift.tasks.estimate import estimate_night
from nightshift.tasks.s1_plan_shards import plan_shards


@flow(name="nightshift-plan")
def plan_night(
    input_path: str,
    job: JobSpec | None = None,
    model: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    corpus: CorpusOptions | None = None,
    deadline: str | None = None,
    pricing: str | None = None,
    history: str | None = None,
) -> dict:
    """Estimate a run of `job` (or the ModelConfig block `model`) over `input_path` by
    `deadline`, priced by the GpuPricing block `pricing`, from the runs under `history`."""
    if deadline:
        parse_deadline(deadline)  # a bad one fails the flow run before anything is read
    job = job or ModelConfig.job_named(model)
    scratch = tempfile.mkdtemp(prefix="nightshift-plan-")
    try:
        planned = plan_shards(input_path, scratch, shard_size, corpus, group_prefixes=job.regroup_shards)
        return estimate_night(planned, job, deadline, GpuPricing.load(pricing) if pricing else None, history)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
