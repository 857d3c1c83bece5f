"""Prefect events a run emits: what Automations trigger on (page someone when a nightly run's
canaries fail) and what the dashboard's event feed shows.

    nightshift.run.completed     the run merged, validated and reported
    nightshift.run.expired       stopped at its deadline: finished rows merged, the rest batch_expired
    nightshift.run.failed        ended by an error (validation failures included: see below)
    nightshift.validation.failed the canary gate failed: outputs written, NOT validated
    nightshift.validation.skipped no check applied to the run's rows: not validated, each reason said
    nightshift.shard.completed   a shard's rows are all on disk

The resource is the run directory (`nightshift.run.<digest>`, named by its path); related: the
model (role "model") and, for a deployment's flow run, the deployment and the flow run. The
payload holds the figures — rows, failed, tokens, dollars, validated — read from the run's own
files, never a parameter or a secret. Emitting never fails a run: an event that cannot be sent
is a warning in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging

from nightshift.config import JobSpec
from nightshift.records import headline_of
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import location

log = logging.getLogger("nightshift.events")

RUN_COMPLETED = "nightshift.run.completed"
RUN_EXPIRED = "nightshift.run.expired"
RUN_FAILED = "nightshift.run.failed"
VALIDATION_FAILED = "nightshift.validation.failed"
VALIDATION_SKIPPED = "nightshift.validation.skipped"
SHARD_COMPLETED = "nightshift.shard.completed"


def run_resource(run_dir: RunDir) -> dict[str, str]:
    root = str(run_dir)
    return {
        "prefect.resource.id": f"nightshift.run.{hashlib.sha256(root.encode()).hexdigest()[:16]}",
        "prefect.resource.name": root,
        "nightshift.run_dir": root,
    }


def related_resources(job: JobSpec) -> list[dict[str, str]]:
    from prefect.runtime import deployment, flow_run

    related = [
        {
            "prefect.resource.id": f"nightshift.model.{job.served_model_name}",
            "prefect.resource.role": "model",
            "prefect.resource.name": job.served_model_name,
        }
    ]
    if deployment.id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment.id}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": deployment.name or "",
            }
        )
    if flow_run.id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": flow_run.name or "",
            }
        )
    return related


def run_figures(run_dir: RunDir) -> dict[str, object]:
    """What the run's files say it did: rows, failed, tokens, $ and whether it validated."""
    figures: dict[str, object] = {}
    report = _json(run_dir.report_json)
    if report:
        figures.update(headline_of(report))
    verdict = _json(run_dir.validation)
    if verdict:
        figures["validated"] = verdict.get("validated")
        figures["validation_failures"] = verdict.get("failures") or []
    return figures


def emit(event: str, run_dir: RunDir, job: JobSpec, run_figures_too: bool = True, **payload) -> None:
    """Emit `event` for the run in `run_dir` with `payload`, and the run's figures unless told not
    to (a shard's event carries its own: mid-run, the run's files are an earlier attempt's)."""
    try:
        from prefect.events import emit_event

        figures = run_figures(run_dir) if run_figures_too else {}
        emit_event(
            event,
            resource=run_resource(run_dir),
            related=related_resources(job),
            payload={**figures, **payload},
        )
    except Exception as exc:  # an event is news, not the run's work
        log.warning("could not emit %s: %s", event, exc)


def _json(path) -> dict | None:
    try:
        return json.loads(location(path).read_text())
    except (OSError, ValueError):
        return None
