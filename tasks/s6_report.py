"""Report stage: the run's cost and throughput report (nightshift.report: measured from its files,
priced as the hardware it ran on, rendered), written beside the outputs and, inside a flow, as
Prefect artifacts with stable keys (one version per run) and the report asset's materialization."""

from __future__ import annotations

import re

from prefect import get_run_logger, task

from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
from nightshift.observe.assets import record_report
from nightshift.records import CostReport
from nightshift.report import artifact_markdown, cost_line, write_report
from nightshift.runtime.rundir import RunDir


@task(name="cost-report")
def cost_report(run_dir: str, pricing: GpuPricing | None = None, managed: ManagedApiPrices | None = None) -> CostReport:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rd = RunDir(run_dir)
    report = write_report(rd, pricing or GpuPricing(), managed or ManagedApiPrices())
    key = re.sub(r"[^a-z0-9-]+", "-", rd.root.name.lower()).strip("-") or "run"
    create_markdown_artifact(
        key=f"nightshift-report-{key}",
        markdown=artifact_markdown(rd),
        description="Nightshift cost and throughput report",
    )
    table = {k: v for k, v in report.figures().items() if not isinstance(v, (dict, list))}
    create_table_artifact(key=f"nightshift-figures-{key}", table=[table], description="Nightshift run figures")
    get_run_logger().info(cost_line(report))
    record_report(rd, report)  # run by the flow as the report asset's materializing task
    return report
