"""The shard-generation flow a GPU work pool runs: one engine load, a group of shards.

The main flow dispatches it through the `nightshift-generate-shards/gpu` deployment (see
nightshift/fleet/fan_out.py); it generates through the same cached tasks as a local run, so a shard
finished anywhere is finished everywhere.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from nightshift.blocks.storage import storage_options_of
from nightshift.config import JobSpec
from nightshift.drills import stall_if_drilled
from nightshift.fleet.workers import handing_on_if_the_engine_cannot_start, heartbeat, write_group_manifest
from nightshift.records import Shard
from nightshift.runtime.deadline import DeadlineTimer, parse_deadline
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import use_storage_options
from nightshift.tasks.s3_generate import generate_here


@flow(name="nightshift-generate-shards", task_runner=ThreadPoolTaskRunner(max_workers=2))
def generate_shards(
    shards: list[Shard],
    job: JobSpec,
    run_dir: str,
    checkpoint_storage: str,
    group: str,
    storage: str | None = None,
    deadline: str | None = None,
) -> int:
    """Generate `shards` of the run in `run_dir`; returns how many came back Cached.
    `storage` names the ObjectStorage block whose credentials reach an `s3://` run directory
    (default: this machine's environment or role). At `deadline` (the parent run's, an ISO
    date-time) generation stops admitting rows and flushes what finished."""
    if storage:
        use_storage_options(storage_options_of(storage))
    rd = RunDir(run_dir)
    with (
        heartbeat(rd, group),
        DeadlineTimer(parse_deadline(deadline) if deadline else None),
        handing_on_if_the_engine_cannot_start(rd, group),
    ):
        stall_if_drilled()
        # on a fleet of engine servers each group starts on its own one (the same in every attempt)
        job = job.model_copy(update={"engine": job.engine.spread_over_servers(group)})
        results, cached = generate_here(shards, job, run_dir, checkpoint_storage)
        write_group_manifest(rd, group, results, cached)
    return cached
