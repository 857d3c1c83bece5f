"""The report as people read it: report.md's tables and lines, the throughput chart, the
dashboard's artifact and the one log line — rendering only, from the `CostReport` record."""

from __future__ import annotations

from pathlib import Path

from nightshift.config import JobSpec
from nightshift.records import CostReport, ShardMetrics
from nightshift.report.measure import chunk_landings
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import written_whole


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _fmt(value, unit="", digits=2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def render_markdown(report: CostReport, chart: str | None) -> str:
    lines = _headline(report) + _figures_table(report) + _by_model_table(report) + _engine_lines(report)
    lines += _politeness_lines(report) + _straggler_and_error_lines(report)
    if chart:
        lines += [f"![tokens/s and GPU utilization over the run]({chart})", ""]
    lines += _validation_lines(report)
    return "\n".join(lines) + "\n"


def _headline(report: CostReport) -> list[str]:
    gpu = (
        f"{report.gpu_count} × {report.gpu_name}, utilization {_fmt(report.gpu_utilization_mean, ' %', 1)}"
        if report.gpu_name
        else f"no GPU telemetry: {report.gpu_telemetry} (GPU fields are null)"
    )
    return [
        f"# Nightshift run report — {Path(report.run_dir).name}",
        "",
        f"Model **{report.model}** (context {_fmt(report.max_model_len, ' tokens', 0)}) on "
        f"**{report.accelerator}**. {gpu}.",
        "",
    ]


def _figures_table(report: CostReport) -> list[str]:
    saved, fmt = report.served_without_generating, _fmt
    images = f" ({report.image_tokens:,} of the prompt tokens from images)" if report.image_tokens else ""
    return [
        "| figure | value |",
        "|---|---|",
        f"| rows (failed) | {report.rows:,} ({report.failed:,}) |",
        f"| prompt / completion tokens | {report.prompt_tokens:,} / {report.completion_tokens:,}{images} |",
        f"| generate time | {fmt(report.generate_seconds, ' s', 1)} |",
        f"| tokens/s (output tokens/s) | {fmt(report.tokens_per_second, '', 1)} "
        f"({fmt(report.output_tokens_per_second, '', 1)}) |",
        f"| rows/s (documents/s) | {fmt(report.rows_per_second, '', 1)} |",
        f"| accelerator-hours | {fmt(report.accelerator_hours, '', 4)} |",
        f"| cost on demand / spot | ${fmt(report.cost_on_demand, '', 4)} / ${fmt(report.cost_spot, '', 4)} |",
        f"| $ per 1M tokens, on demand / spot | {fmt(report.cost_per_million_tokens, '', 4)} / "
        f"{fmt(report.cost_per_million_tokens_spot, '', 4)} |",
        f"| $ per 1M output tokens, on demand / spot | {fmt(report.cost_per_million_output_tokens, '', 4)} / "
        f"{fmt(report.cost_per_million_output_tokens_spot, '', 4)} |",
        f"| $ per 1M rows, on demand / spot | {fmt(report.cost_per_million_rows, '', 4)} / "
        f"{fmt(report.cost_per_million_rows_spot, '', 4)} |",
        f"| truncated (finish_reason = length) | {100 * report.truncation_share:.1f} % |",
        f"| prompt tokens served by the prefix cache | {fmt(_percent(report.prefix_cache_hit_rate), ' %', 1)} |",
        f"| answered from an identical row or the result cache, not generated | {saved.rows:,} rows, "
        f"{saved.tokens:,} tokens, ${fmt(saved.cost_saved_on_demand, '', 4)} saved |",
        f"| projected for {report.projection.rows:,} rows | {fmt(report.projection.hours, ' h', 2)}, "
        f"${fmt(report.projection.cost_on_demand, '', 2)} on demand, "
        f"${fmt(report.projection.cost_spot, '', 2)} spot |",
        "",
        "The same tokens on managed batch APIs (list prices as configured): "
        + ", ".join(f"{name} ${cost:,.4f}" for name, cost in report.managed_api_cost.items()),
        "",
    ]


def _by_model_table(report: CostReport) -> list[str]:
    if not report.by_model:
        return []
    return [
        "| model (LoRA adapters) | rows | prompt / completion tokens | cost on demand / spot |",
        "|---|---|---|---|",
        *(
            f"| {name} | {share.rows:,} | {share.prompt_tokens:,} / {share.completion_tokens:,} | "
            f"${_fmt(share.cost_on_demand, '', 4)} / ${_fmt(share.cost_spot, '', 4)} |"
            for name, share in report.by_model.items()
        ),
        "",
    ]


def _engine_lines(report: CostReport) -> list[str]:
    if not report.engine_settings:
        return []
    settings = ", ".join(f"{name} {value}" for name, value in report.engine_settings.items())
    lines = [f"Engine settings as vLLM resolved them: {settings}.", ""]
    lines += [f"- ⚠ {warning}" for warning in report.engine_warnings] + ([""] if report.engine_warnings else [])
    return lines


def _politeness_lines(report: CostReport) -> list[str]:
    p = report.politeness
    if not p:
        return []
    return [
        f"Shared with online traffic: its time to first token p50 {_fmt(p.online_ttft_ms_p50, ' ms', 0)}, "
        f"p95 {_fmt(p.online_ttft_ms_p95, ' ms', 0)} against an objective of {p.objective_ms:,.0f} ms "
        f"({100 * p.over_objective:.0f} % of {p.looks} probes over it); rows in flight {p.in_flight_min}–"
        f"{p.in_flight_max}, median {p.in_flight_median:g}.",
        "",
    ]


def _straggler_and_error_lines(report: CostReport) -> list[str]:
    lines = []
    if report.stragglers:
        lines += ["Slowest shards against the median:", ""]
        lines += [f"- shard {s.shard}: {s.engine_seconds} s ({s.times_median}× median)" for s in report.stragglers]
        lines.append("")
    if report.errors_by_code:
        lines += ["Errors by code: " + ", ".join(f"`{c}` {n}" for c, n in report.errors_by_code.items()), ""]
    return lines


def _validation_lines(report: CostReport) -> list[str]:
    if report.validated is None:
        return []
    lines = ["## Validation", "", _validation_heading(report), ""]
    lines += [f"- {failure}" for failure in report.validation_failures]
    lines += [
        f"- {name}: " + ", ".join(f"{k} {v}" for k, v in check.items())
        for name, check in report.validation_checks.items()
    ]
    return lines


def _validation_heading(report: CostReport) -> str:
    """The verdict in bold, and what the checks took and cost."""
    money = report.validation_cost_on_demand
    cost = (
        f" in {report.validation_seconds:.1f} s" + (f" (${money:.4f} on demand)" if money is not None else "")
        if report.validation_seconds is not None
        else ""
    )
    said = {
        "validated": "Validated",
        "failed": "FAILED: NOT validated",
        "not_validated": "Not validated: no check applied (each check below says why)",
    }.get(report.validation_state or "", "Validated" if report.validated else "NOT validated")
    return f"**{said}**{cost}"


def render_chart(run_dir: RunDir, path: Path) -> Path | None:
    """Tokens/s over the run as the engine finished rows (every shard attempt's per-second
    timeline in its metrics.json, summed across shards and workers), with GPU utilization where
    pynvml sampled it. Runs without timelines (a killed attempt, older runs) fall back to when
    chunk files landed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline: dict[int, int] = {}
    samples, looks = [], []
    for metrics_file in run_dir.every_shard_metrics():
        metrics = ShardMetrics.load(metrics_file)
        for second, tokens in metrics.token_timeline:
            timeline[second] = timeline.get(second, 0) + tokens
        samples += [(s["t"], s["util"]) for s in metrics.gpu_samples]
        looks += map(tuple, metrics.politeness or [])
    source = "tokens the engine finished"
    if not timeline:
        timeline, source = chunk_landings(run_dir), "tokens in chunk files as they landed"
    if not timeline:
        return None
    first, last = min(timeline), max(timeline)
    width = max(1, -(-(last - first + 1) // 200))  # whole seconds, at most about 200 bars
    bins: dict[int, int] = {}
    for second, tokens in timeline.items():
        start = first + (second - first) // width * width
        bins[start] = bins.get(start, 0) + tokens
    xs = list(range(first, last + 1, width))
    ys = [bins.get(x, 0) / width for x in xs]
    if looks:  # a second panel: the rows in flight the controller allowed, and the online TTFT it saw
        fig, (ax, shared) = plt.subplots(2, 1, figsize=(8, 5.4), dpi=100, sharex=True)
        _plot_politeness(shared, sorted(set(looks)), first, JobSpec.load(run_dir.job).engine.online_ttft_slo_ms)
    else:
        fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.fill_between([x - first for x in xs], ys, step="post", color="tab:blue", alpha=0.35, lw=0)
    ax.step([x - first for x in xs], ys, where="post", color="tab:blue", lw=1)
    ax.set_xlabel("seconds since generation started")
    ax.set_ylabel(f"tokens/s ({width} s bins)", color="tab:blue")
    ax.set_xlim(0, max(last - first + width, 1))
    ax.set_ylim(bottom=0)
    if samples:
        gpu = ax.twinx()
        samples.sort()
        gpu.plot([t - first for t, _ in samples], [u for _, u in samples], color="tab:green", lw=0.8)
        gpu.set_ylabel("GPU utilization %", color="tab:green")
        gpu.set_ylim(0, 100)
        ax.set_title(source, fontsize=9)
    else:
        ax.set_title(f"{source}; no GPU telemetry on this host", fontsize=9)
    fig.tight_layout()
    with written_whole(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _plot_politeness(ax, looks: list[tuple[float, float | None, int]], first: int, objective: float | None) -> None:
    at = [t - first for t, _, _ in looks]
    ax.step(at, [limit for _, _, limit in looks], where="post", color="tab:orange", lw=1.2)
    ax.set_ylabel("rows in flight", color="tab:orange")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since generation started")
    online = ax.twinx()
    measured = [(t - first, ttft) for t, ttft, _ in looks if ttft is not None]
    online.plot([t for t, _ in measured], [ttft for _, ttft in measured], ".", color="tab:red", ms=3)
    if objective is not None:
        online.axhline(objective, color="tab:red", lw=0.8, ls="--")
    online.set_ylabel("online TTFT ms (probe)", color="tab:red")
    online.set_ylim(bottom=0)


def artifact_markdown(run_dir: RunDir) -> str:
    """report.md for the dashboard: the chart inlined as a data URI (the UI cannot reach a
    file in the run directory, and renders a PNG data URI in a markdown image)."""
    import base64

    markdown = run_dir.report_markdown.read_text()
    chart = run_dir.report_chart
    if chart.exists():
        inline = "data:image/png;base64," + base64.b64encode(chart.read_bytes()).decode()
        markdown = markdown.replace(f"]({chart.name})", f"]({inline})")
    return markdown


def cost_line(report: CostReport) -> str:
    """The report in one log line: throughput and what the run cost."""
    rate = report.tokens_per_second
    per_million = report.cost_per_million_tokens
    money = (
        f"${report.cost_on_demand:.4f} on demand, ${report.cost_spot:.4f} spot"
        if report.cost_on_demand is not None
        else "unpriced (the catalog of the GpuPricing block has no price for this accelerator)"
    )
    return (
        f"cost: {money} ({report.accelerator_hours:.4f} {report.accelerator}-hours); "
        f"{f'{rate:,.0f} tokens/s' if rate else 'nothing generated'}"
        + (f", ${per_million:.4f} per 1M tokens" if per_million else "")
    )
