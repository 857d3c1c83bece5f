"""The whole job from Python, as `nightshift run` does it: the input checked, the run directory's
lease taken, the engine loading at once, then the `nightshift-batch` flow.

Nothing here imports Prefect or vLLM at module level: the engine starts loading before
Prefect's import and start-up, which then overlap it (docs/architecture.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nightshift.config import CanaryConfig, CorpusOptions, JobSpec
    from nightshift.records import RunReport


def run_job(
    input_path: str,
    run_dir: str,
    job: JobSpec,
    shard_size: int | None = None,
    corpus: CorpusOptions | None = None,
    validation: CanaryConfig | None = None,
    deadline: str | None = None,
) -> RunReport:
    """Run the flow: plan, generate, merge, report, validate. An input that cannot be used at
    all fails here in milliseconds, then a configuration the model refuses (about a second);
    otherwise the engine starts loading at once, alongside Prefect's start-up and planning."""
    from nightshift.inputs import check_input, detect_kind

    check_input(input_path, detect_kind(input_path, corpus), corpus)  # before vLLM is even imported
    from nightshift.engine.local import start_engine_in_background
    from nightshift.jobs import check_job, size_for_input
    from nightshift.runtime.lease import run_lease
    from nightshift.runtime.rundir import RunDir

    job = size_for_input(check_job(job), input_path, corpus)
    with run_lease(RunDir(run_dir)):  # before the engine loads: a second run on a live directory costs nothing
        start_engine_in_background(job.engine)
        from nightshift.runtime.local_prefect import use_shared_server

        use_shared_server()  # no Prefect server configured: the machine's shared temporary one, found or started
        from nightshift.flows.batch import batch_inference  # Prefect's import and start-up overlap the engine's load

        sizes = {"shard_size": shard_size} if shard_size else {}
        if os.environ.get("NIGHTSHIFT_RUN_NAME"):  # `nightshift serve` names each batch's flow run after it
            batch_inference = batch_inference.with_options(flow_run_name=os.environ["NIGHTSHIFT_RUN_NAME"])
        return batch_inference(
            input_path=input_path,
            run_dir=run_dir,
            job=job,
            corpus=corpus,
            validation=validation,
            deadline=deadline,
            **sizes,
        )
