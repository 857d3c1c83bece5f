"""Estimate stage of the `nightshift-plan` flow: tokens, hours, GPUs for a deadline and cost of a
planned input (nightshift/stages/estimate.py), shown in the dashboard as a markdown artifact."""

from __future__ import annotations

import re

from prefect import task

from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
from nightshift.config import JobSpec
from nightshift.records import Plan
from nightshift.runtime.deadline import parse_deadline
from nightshift.stages.estimate import estimate_input, render


@task(name="estimate-night")
def estimate_night(
    plan: Plan,
    job: JobSpec,
    deadline: str | None = None,
    pricing: GpuPricing | None = None,
    history: str | None = None,
) -> dict:
    from prefect.artifacts import create_markdown_artifact

    result = estimate_input(
        plan, job, pricing or GpuPricing(), ManagedApiPrices(), parse_deadline(deadline) if deadline else None, history
    )
    key = re.sub(r"[^a-z0-9-]+", "-", f"nightshift-plan-{job.served_model_name}".lower()).strip("-")
    create_markdown_artifact(key=key, markdown=render(result), description="Nightshift plan: tokens, GPUs, cost")
    return result.model_dump()
