"""The cost and throughput report of a run: measured from its files (`measure`, SQL in DuckDB),
priced as the hardware it ran on (`price`, arithmetic, at a rate from the catalog in `pricing`),
rendered (`render`). `write_report`
writes `report.json`, `report.md` and `report.png` beside the outputs; the report stage's task
(tasks/s6_report.py) adds the dashboard's artifacts."""

from __future__ import annotations

from nightshift.config import JobSpec
from nightshift.records import CostReport, Plan
from nightshift.report.measure import engine_time, errors_by_code, politeness, row_totals, trend
from nightshift.report.price import engine_figures, priced, validation_figures
from nightshift.report.pricing import ManagedPrices, RateSource
from nightshift.report.render import artifact_markdown, cost_line, render_chart, render_markdown
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import written_whole
from nightshift.stages.chunks import shard_cache_key

__all__ = [
    "artifact_markdown",
    "build_report",
    "cost_line",
    "engine_time",
    "priced",
    "row_totals",
    "trend",
    "write_report",
]


def build_report(
    run_dir: RunDir,
    pricing: RateSource,
    managed: ManagedPrices,
    project_rows: int = 1_000_000,
) -> CostReport:
    """report.json's content: the run's rows and engine time, measured from its files, priced."""
    plan, job = Plan.load(run_dir.plan_manifest), JobSpec.load(run_dir.job)
    outputs = [run_dir.shard_output(shard_cache_key(s, job)) for s in plan.shards]
    totals, time = row_totals(run_dir, outputs, job.served_model_name), engine_time(outputs)
    return CostReport(
        run_dir=str(run_dir.root),
        model=job.served_model_name,
        rows=totals.rows,
        failed=totals.rows - totals.succeeded,
        prompt_tokens=totals.prompt_tokens,
        image_tokens=totals.image_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.prompt_tokens + totals.completion_tokens,
        truncation_share=round(totals.truncation_share, 4),
        errors_by_code=errors_by_code(run_dir),
        politeness=politeness(run_dir, job),
        **dict(validation_figures(run_dir, pricing.rate(time.gpu_name, time.gpu_count))),
        **dict(engine_figures(time)),
        **dict(priced(totals, time, pricing, managed, project_rows)),
    )


def write_report(run_dir: RunDir, pricing: RateSource, managed: ManagedPrices) -> CostReport:
    report = build_report(run_dir, pricing, managed)
    chart = render_chart(run_dir, run_dir.report_chart)
    report.save(run_dir.report_json)
    with written_whole(run_dir.report_markdown) as tmp:
        tmp.write_text(render_markdown(report, chart.name if chart else None))
    return report
