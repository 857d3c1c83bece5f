"""A batch as a flow run of a Prefect deployment: its work pool's workers run it, reading the
input from and writing the run directory to the server's storage (shared with the workers).
The pool decides its own concurrency; the flow run's idempotency key gives a restarted server
the same run back."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

from nightshift.batch_api.runs import STOP_GRACE_S, BatchRuns, RunEnd, RunOrder, StartedRun
from nightshift.batch_api.store import Store, StoredBatch
from nightshift.config import BatchApiConfig
from nightshift.records import Verdict
from nightshift.runtime.storage import is_url

log = logging.getLogger("nightshift.serve")


class DeploymentRuns(BatchRuns):
    def __init__(self, config: BatchApiConfig, store: Store) -> None:
        self.deployment, self.store = config.deployment, store

    def room(self) -> int:
        return sys.maxsize  # the work pool's concurrency limit decides when each flow run starts

    def start(self, stored: StoredBatch, order: RunOrder) -> StartedRun:
        from prefect.deployments import run_deployment

        from nightshift.jobs import make_job

        run = run_deployment(
            self.deployment,
            parameters={
                "input_path": _absolute(order.input_path),
                "run_dir": str(order.run_dir),
                "job": make_job(order.model, **order.job_settings()).model_dump(),
                "deadline": order.deadline.isoformat(),
                "fan_out": None,
            },
            timeout=0,
            idempotency_key=f"{order.batch_id}:{order.attempt}",  # a restarted server gets the same run back
            flow_run_name=f"batch {order.batch_id}",
        )
        return StartedRun(f"flow run {run.name} of {self.deployment}", record={"flow_run_id": str(run.id)})

    def running(self, stored: StoredBatch) -> bool:
        if not stored.flow_run_id:
            return False
        state = self._flow_run(stored).state
        return state is not None and not state.is_final()

    def ended(self, stored: StoredBatch) -> RunEnd | None:
        if not stored.flow_run_id:  # the server stopped before it dispatched the run
            return RunEnd.LOST
        state = self._flow_run(stored).state
        if state is None or not state.is_final():
            return None
        if state.is_completed():
            return RunEnd.EXPIRED if state.name == "Expired" else RunEnd.COMPLETED
        validation = self.store.run_dir(stored.batch.id).validation
        if state.is_failed() and validation.exists() and Verdict.load(validation).verdict == "failed":
            return RunEnd.GATE_FAILED
        log.warning("batch %s: flow run ended %s (%s)", stored.batch.id, state.name, state.message)
        return RunEnd.LOST

    def stop(self, stored: StoredBatch) -> None:
        """Cancel the flow run and wait (bounded) until its worker has stopped it."""
        if not stored.flow_run_id:
            return
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            run_id = uuid.UUID(stored.flow_run_id)
            state = client.read_flow_run(run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(run_id, Cancelling(message="the batch was cancelled or expired"), force=True)
            give_up = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < give_up:
                state = client.read_flow_run(run_id).state
                if state is None or state.is_final():
                    return
                time.sleep(1)

    def last_words(self, stored: StoredBatch) -> str:
        if not stored.flow_run_id:
            return "the batch's flow run never started"
        state = self._flow_run(stored).state
        return (state.message if state and state.message else "the batch's flow run failed")[:2000]

    def shutdown(self) -> None:
        """Flow runs go on on their pool without this server; the next one follows them."""

    def _flow_run(self, stored: StoredBatch):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(stored.flow_run_id))


def _absolute(path) -> str:
    """A path as workers elsewhere must be given it: a bucket URL as it is, a local path absolute."""
    return str(path) if is_url(str(path)) else str(Path(path).resolve())
