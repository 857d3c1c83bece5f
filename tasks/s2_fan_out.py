"""Fan-out stage: the generate stage run on a GPU work pool, one child flow run per shard group,
and the canary checks run there too — thin @task functions over nightshift/fleet/fan_out.py, which
says what the dispatcher guarantees (no double dispatch, bounded in flight, lost workers, work
done kept, unfit workers handing work on, stragglers)."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from nightshift.config import CanaryConfig, FanOut, JobSpec
from nightshift.fleet import fan_out as dispatch
from nightshift.records import Shard, ShardResult
from nightshift.runtime.rundir import RunDir


@task(name="dispatch-shard-groups")
def dispatch_shard_groups(
    shards: list[Shard],
    job: JobSpec,
    run_dir: str,
    checkpoint_storage: str,
    fan_out: FanOut,
    storage: str | None = None,
    deadline: datetime | None = None,
) -> tuple[list[ShardResult], int]:
    """Generate `shards` on the work pool behind `fan_out.deployment` (nightshift.fleet.fan_out)."""
    return dispatch.dispatch_shard_groups(shards, job, RunDir(run_dir), checkpoint_storage, fan_out, storage, deadline)


@task(name="validate-on-pool")
def validate_on_pool(
    run_dir: str, job: JobSpec, validation: CanaryConfig, fan_out: FanOut, storage: str | None = None
) -> str:
    """The canary checks as a flow run of `fan_out.validation_deployment` (nightshift.fleet.fan_out)."""
    return dispatch.validate_on_pool(RunDir(run_dir), job, validation, fan_out, storage)
