"""The canary checks as a flow run on the GPU pool: with fan-out, the orchestrating flow has no
engine and may not hold the reference model, so the parent dispatches this flow through the
`nightshift-validate/gpu` deployment (nightshift/fleet/fan_out.py: validate_on_pool) and gates on the
verdict it writes to the run directory."""

from __future__ import annotations

from prefect import flow

from nightshift.blocks.storage import storage_options_of
from nightshift.config import CanaryConfig, JobSpec
from nightshift.fleet.workers import handing_on_if_the_engine_cannot_start, heartbeat
from nightshift.runtime.rundir import VALIDATION_GROUP, RunDir
from nightshift.runtime.storage import use_storage_options
from nightshift.validation.gate import validate


@flow(name="nightshift-validate")
def validate_run(run_dir: str, job: JobSpec, validation: CanaryConfig, storage: str | None = None) -> bool:
    """Validate the merged run in `run_dir` (oracle, determinism, canaries) on this worker and
    leave the verdict under this flow run's name, `groups/validation/<flow run id>.verdict`;
    returns whether it passed. The parent reads that verdict — not one a duplicate of this run
    wrote — into `validation.json` and fails on a failed one."""
    from prefect.runtime import flow_run

    if storage:
        use_storage_options(storage_options_of(storage))
    rd = RunDir(run_dir)
    with heartbeat(rd, VALIDATION_GROUP), handing_on_if_the_engine_cannot_start(rd, VALIDATION_GROUP):
        verdict = validate(rd, job, validation)
        verdict.save(rd.validation_verdict(flow_run.id))
        return verdict.verdict != "failed"
