"""A run's files as Prefect assets, so the dashboard's lineage view shows input → run → outputs
→ report: the merge stage materializes output.jsonl, errors.jsonl, results.parquet (and an
embedded corpus's embeddings.parquet), each depending on the input; the report stage
materializes report.json, depending on them. Each carries its figures as asset metadata (rows,
tokens, $ per 1M tokens, validated). An asset's key is its URL: `s3://…` as it is, a local file
as `file:///…`.
"""

from __future__ import annotations

from pathlib import Path

from nightshift.records import CostReport, RunReport
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import is_url


def asset_key(path) -> str:
    path = str(path)
    return path if is_url(path) else Path(path).resolve().as_uri()


def input_asset(input_path: str):
    from prefect.assets import Asset, AssetProperties

    return Asset(key=asset_key(input_path), properties=AssetProperties(name=Path(input_path).name,
                 description="a Nightshift run's input"))  # fmt: skip


def output_assets(run_dir: RunDir, embedded: bool) -> list:
    outputs = {
        run_dir.output: "OpenAI Batch output lines of the rows that succeeded",
        run_dir.errors: "OpenAI-style error lines of the rows that failed",
        run_dir.results: "one row per input row: text, finish reason, tokens",
    }
    if embedded:
        outputs[run_dir.embeddings] = "the corpus's vectors, one row per document"
    return [_run_file_asset(run_dir, path, description) for path, description in outputs.items()]


def report_asset(run_dir: RunDir):
    return _run_file_asset(run_dir, run_dir.report_json, "the run's cost, throughput and validation")


def _run_file_asset(rd: RunDir, path, description: str):
    """A file of the run directory as an asset, named `<run directory>/<file>`."""
    from prefect.assets import Asset, AssetProperties

    name = f"{rd.root.name}/{Path(str(path)).name}"
    return Asset(key=asset_key(path), properties=AssetProperties(name=name, description=description))


def materializing(task, assets: list, depends_on: list):
    """`task` as a Prefect task that materializes `assets` from `depends_on`, for this run's paths."""
    from prefect.tasks import MaterializingTask

    options = {"name": task.name, "retries": task.retries, "retry_delay_seconds": task.retry_delay_seconds,
               "tags": task.tags, "timeout_seconds": task.timeout_seconds}  # fmt: skip
    return MaterializingTask(fn=task.fn, assets=assets, asset_deps=depends_on, **options)


def record_outputs(report: RunReport) -> None:
    """The merged figures on each output asset (inside the merge's materializing task run)."""
    figures = {
        "rows": report.total_rows,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "errors_by_code": report.errors_by_code,
    }
    _record({asset_key(path): figures for path in _outputs(report)})


def record_report(run_dir: RunDir, cost: CostReport) -> None:
    """The run's figures on the report asset (inside the report's materializing task run)."""
    _record({asset_key(run_dir.report_json): {**cost.headline_figures(), "validated": cost.validated}})


def _outputs(report: RunReport) -> list[str]:
    return [p for p in (report.output_path, report.errors_path, report.results_path, report.embeddings_path) if p]


def _record(metadata: dict[str, dict]) -> None:
    from prefect.assets import add_asset_metadata
    from prefect.context import AssetContext

    context = AssetContext.get()
    if context is None:  # called as a plain function (tests, `nightshift retry`): no assets to tell
        return
    declared = {asset.key for asset in context.downstream_assets}
    for key, figures in metadata.items():
        if key in declared:
            add_asset_metadata(key, figures)
