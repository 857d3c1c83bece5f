"""Report stage: cost and throughput of a run, as plain SQL over its files, then priced.

Sources: `results.parquet` (one row per input row: tokens, finish reason), the shards'
`metrics.json` (timings, GPU telemetry) and chunk files (when rows finished, for the
throughput-over-time chart). `build_report` measures (`row_totals`, `engine_time`: the SQL) and
prices (`priced`: pure arithmetic on those records and the pricing block, which the fast tests
call directly). Writes `report.json`, `report.md` and `report.png` beside the outputs and,
inside a flow, Prefect artifacts with stable keys (one version per run).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from prefect import get_run_logger, task

from nightshift.assets import record_report
from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices, Rate
from nightshift.chunks import best_rows_sql, chunk_files, shard_cache_key, sql_path_list
from nightshift.config import JobSpec
from nightshift.engine.sizing import throughput_traps
from nightshift.estimate import managed_api_cost
from nightshift.records import (
    CostReport,
    EngineTime,
    ModelRows,
    Plan,
    Politeness,
    RowTotals,
    RunReport,
    ShardMetrics,
    Verdict,
)
from nightshift.rundir import RunDir
from nightshift.storage import duckdb_connection, local_copies, sql_path, written_whole


def build_report(
    run_dir: RunDir,
    pricing: GpuPricing | None = None,
    managed: ManagedApiPrices | None = None,
    project_rows: int = 1_000_000,
) -> CostReport:
    """report.json's content: the run's rows and engine time, measured from its files, priced."""
    pricing, managed = pricing or GpuPricing(), managed or ManagedApiPrices()
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
        errors_by_code=_errors_by_code(run_dir),
        **_validation_figures(run_dir, pricing.rate(time.gpu_name, time.gpu_count)),
        **_engine_figures(time),
        politeness=_politeness(run_dir, job),
        **priced(totals, time, pricing, managed, project_rows),
    )


def _engine_figures(time: EngineTime) -> dict:
    """The engine settings that really ran (the latest shard's engine), and the traps they show."""
    if not time.engine_settings:
        return {}
    return {
        "engine_settings": time.engine_settings,
        "engine_warnings": throughput_traps(time.engine_settings, on_gpu=time.gpu_count > 0),
    }


def _politeness(run_dir: RunDir, job: JobSpec) -> Politeness | None:
    """The online TTFT the politeness controller's probes saw, and the rows in flight it allowed."""
    objective = job.engine.online_ttft_slo_ms
    if objective is None:
        return None
    # shards that ran side by side on one engine each kept its looks: count every probe once
    looks = sorted(
        {tuple(look) for f in run_dir.every_shard_metrics() for look in ShardMetrics.load(f).politeness or []}
    )
    if not looks:
        return None
    ttfts = sorted(ttft for _, ttft, _ in looks if ttft is not None)
    limits = sorted(limit for _, _, limit in looks)
    return Politeness(
        objective_ms=objective,
        looks=len(looks),
        online_ttft_ms_p50=_quantile(ttfts, 0.5),
        online_ttft_ms_p95=_quantile(ttfts, 0.95),
        over_objective=round(sum(t > objective for t in ttfts) / len(ttfts), 4) if ttfts else 0.0,
        in_flight_min=limits[0],
        in_flight_median=statistics.median(limits),
        in_flight_max=limits[-1],
    )


def _quantile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 1) if ordered else None


def row_totals(run_dir: RunDir, shard_outputs: list[Path], base_model: str = "") -> RowTotals:
    """What the run's rows add up to: `results.parquet` once merged, else what the shards' chunk
    files hold so far (a run still running, or killed); with LoRA adapters, each model's share
    (the base model's under `base_model`)."""
    merged = run_dir.results.exists() and run_dir.results.stat().st_mtime >= run_dir.plan_manifest.stat().st_mtime
    chunks = [] if merged else [f for output in shard_outputs for f in chunk_files(output)]
    with local_copies(chunks) as chunks, duckdb_connection() as con:
        if merged:
            source = f"SELECT * FROM read_parquet('{sql_path(run_dir.results)}')"
        elif chunks:
            source = best_rows_sql(chunks)
        else:
            source = (
                "SELECT NULL::VARCHAR AS finish_reason, 0 AS prompt_tokens, "
                "0 AS completion_tokens, NULL::VARCHAR AS source, NULL::VARCHAR AS model WHERE false"
            )
        rows, succeeded, prompt_tokens, completion_tokens, truncation, not_generated, tokens_not_generated = con.sql(
            f"""
            SELECT count(*) AS rows,
                   count(*) FILTER (WHERE finish_reason IS NOT NULL) AS succeeded,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   count(*) FILTER (WHERE finish_reason = 'length')
                     / greatest(count(*) FILTER (WHERE finish_reason IS NOT NULL), 1) AS truncation_share,
                   count(*) FILTER (WHERE source IN ('duplicate', 'cache')) AS rows_not_generated,
                   coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE source IN ('duplicate', 'cache')), 0)
            FROM ({source})
            """
        ).fetchall()[0]
        # a run of an older version has no model or image_tokens column: base-model text rows
        columns = con.sql(f"SELECT * FROM ({source}) LIMIT 0").columns
        model = "model" if "model" in columns else "NULL::VARCHAR"
        image_tokens = con.sql(
            f"SELECT coalesce(sum(image_tokens), 0) FROM ({source})" if "image_tokens" in columns else "SELECT 0"
        ).fetchall()[0][0]
        by_model = {
            model or base_model: ModelRows(rows=answered, prompt_tokens=int(prompt), completion_tokens=int(completion))
            for model, answered, prompt, completion in con.sql(
                f"""
                SELECT {model}, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
                FROM ({source}) WHERE finish_reason IS NOT NULL GROUP BY 1 ORDER BY 1 NULLS FIRST
                """
            ).fetchall()
        }
    return RowTotals(
        image_tokens=int(image_tokens),
        by_model=by_model if any(name != base_model for name in by_model) else {},
        rows=rows,
        succeeded=succeeded,
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        truncation_share=truncation,
        rows_not_generated=int(not_generated),
        tokens_not_generated=int(tokens_not_generated),
    )


def engine_time(shard_outputs: list[Path]) -> EngineTime:
    """When the engines ran and what the GPUs did, from the shards' metrics.json files."""
    metric_files = [p for p in map(RunDir.shard_metrics, shard_outputs) if p.exists()]
    if not metric_files:
        return EngineTime()
    with local_copies(metric_files) as metric_files, duckdb_connection() as con:
        metrics = sql_path_list(metric_files)
        con.execute(f"CREATE VIEW metrics AS SELECT * FROM read_json_auto({metrics}, union_by_name = true)")
        columns = {row[0] for row in con.sql("DESCRIBE metrics").fetchall()}
        figures = _time_and_gpu(con, columns) | _context_settings_and_cache(con, columns)
        stragglers = con.sql(
            """
            SELECT shard_index, round(engine_seconds, 2) AS seconds,
                   round(engine_seconds / median(engine_seconds) OVER (), 2) AS times_median
            FROM metrics ORDER BY times_median DESC, shard_index LIMIT 3
            """
        ).fetchall()
    return EngineTime(**figures, stragglers=[(s, sec, r) for s, sec, r in stragglers])


TIME_AND_GPU_SQL = """
    WITH slots AS (
        SELECT max(engine_finished) - min(engine_started) AS seconds
        FROM metrics GROUP BY host, {slot}
    )
    SELECT max(engine_finished) - min(engine_started), (SELECT sum(seconds) FROM slots),
           (SELECT count(*) FROM slots), sum(engine_seconds), any_value(gpu_name),
           max(gpu_count), avg(gpu_util_mean), avg(gpu_mem_mib_mean), avg(gpu_power_w_mean),
           any_value(gpu_telemetry)
    FROM metrics
"""


def _time_and_gpu(con, columns: set[str]) -> dict:
    """Wall time is first start → last finish; billed time adds up each engine slot's own span,
    since shards fanned out to several GPUs run (and bill) side by side."""
    slot = "coalesce(cuda_visible_devices::VARCHAR, '')" if "cuda_visible_devices" in columns else "''"
    span, slot_seconds, slots, engine_seconds, gpu_name, gpu_count, gpu_util, gpu_mem, gpu_power, telemetry = con.sql(
        TIME_AND_GPU_SQL.format(slot=slot)
    ).fetchall()[0]
    return {
        "span_seconds": span,
        "slot_seconds": slot_seconds,
        "slots": slots,
        "engine_seconds": engine_seconds,
        "gpu_name": gpu_name,
        "gpu_count": gpu_count or 0,
        "gpu_utilization_mean": gpu_util,
        "gpu_memory_mib_mean": gpu_mem,
        "gpu_power_w_mean": gpu_power,
        "gpu_telemetry": telemetry,
    }


def _context_settings_and_cache(con, columns: set[str]) -> dict:
    """The context, the engine's settings (the latest shard's) and the prefix cache's hit rate,
    where the metrics hold them (those of earlier versions may not)."""
    context, hit_rate, settings = None, None, None
    if "max_model_len" in columns:
        context = con.sql("SELECT max(max_model_len) FROM metrics").fetchall()[0][0]
    if "engine_settings" in columns:  # as vLLM resolved them, the latest shard's engine
        latest = con.sql(
            "SELECT engine_settings FROM metrics WHERE engine_settings IS NOT NULL "
            "ORDER BY engine_finished DESC LIMIT 1"
        ).fetchall()
        settings = latest[0][0] if latest else None
    if "cached_prompt_tokens" in columns:
        sums = "SELECT sum(cached_prompt_tokens), sum(engine_prompt_tokens) FROM metrics"
        cached, prompt = con.sql(sums).fetchall()[0]
        hit_rate = round(cached / prompt, 4) if prompt else None
    return {"max_model_len": context, "prefix_cache_hit_rate": hit_rate, "engine_settings": settings}


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def priced(
    totals: RowTotals,
    time: EngineTime,
    pricing: GpuPricing,
    managed: ManagedApiPrices,
    project_rows: int = 1_000_000,
) -> dict:
    """The report's throughput and money figures: arithmetic on what was measured, no I/O."""
    rate = pricing.rate(time.gpu_name, time.gpu_count)  # the hardware the run used, as itself
    bill = _Bill.of(totals, time, rate)
    return {
        **_throughput(totals, time),
        **_costs(totals, bill),
        **_gpu_figures(time),
        "accelerator": rate.accelerator,
        # an embedding run has prompt tokens only: it is priced against embedding APIs
        "managed_api_cost": managed_api_cost(
            totals.prompt_tokens,
            totals.completion_tokens,
            bool(totals.prompt_tokens and not totals.completion_tokens),
            managed.prices,
            managed.embedding_prices,
        ),
        "by_model": {
            name: part.model_copy(
                update={
                    "cost_on_demand": _share(bill.on_demand, _token_share(part, bill.tokens)),
                    "cost_spot": _share(bill.spot, _token_share(part, bill.tokens)),
                }
            )
            for name, part in totals.by_model.items()
        },
        "projection": _projection(totals, time, rate, project_rows),
    }


class _Bill:
    """What the run's accelerator time cost, on demand and spot (None where the hardware has no price)."""

    def __init__(self, hours: float, on_demand: float | None, spot: float | None, tokens: int, span: float) -> None:
        self.hours, self.on_demand, self.spot, self.tokens, self.span = hours, on_demand, spot, tokens, span

    @classmethod
    def of(cls, totals: RowTotals, time: EngineTime, rate: Rate) -> _Bill:
        hours = (time.slot_seconds or 0) / 3600 * rate.count
        on_demand = hours * rate.on_demand if rate.priced else None
        spot = hours * rate.spot if rate.priced else None
        return cls(hours, on_demand, spot, totals.prompt_tokens + totals.completion_tokens, time.span_seconds)

    def per_million(self, cost: float | None, count: int) -> float | None:
        return round(cost / (count / 1e6), 6) if count and self.span and cost is not None else None


def _share(cost: float | None, part: float) -> float | None:
    return None if cost is None else round(cost * part, 6)


def _throughput(totals: RowTotals, time: EngineTime) -> dict:
    span = time.span_seconds
    generated = totals.prompt_tokens + totals.completion_tokens - totals.tokens_not_generated  # the engine's work
    return {
        "max_model_len": time.max_model_len,  # the context the engine ran with (the model's own unless set)
        "generate_seconds": round(span, 3) if span else None,
        "engine_seconds_summed": round(time.engine_seconds, 3) if time.engine_seconds else None,
        "engine_slots": time.slots,
        "tokens_per_second": round(generated / span, 2) if span else None,
        "output_tokens_per_second": round(totals.completion_tokens / span, 2) if span else None,
        "rows_per_second": round(totals.rows / span, 2) if span and totals.rows else None,
        "stragglers": [{"shard": s, "engine_seconds": sec, "times_median": r} for s, sec, r in time.stragglers],
        "prefix_cache_hit_rate": time.prefix_cache_hit_rate,
    }


def _costs(totals: RowTotals, bill: _Bill) -> dict:
    generated = bill.tokens - totals.tokens_not_generated
    return {
        # deterministic rows answered by an identical row or the result cache: tokens and $ not spent
        "served_without_generating": {
            "rows": totals.rows_not_generated,
            "tokens": totals.tokens_not_generated,
            "cost_saved_on_demand": (_share(bill.on_demand, totals.tokens_not_generated / generated) or 0.0)
            if generated
            else 0.0,
        },
        "accelerator_hours": round(bill.hours, 6),
        "cost_on_demand": _share(bill.on_demand, 1.0),
        "cost_spot": _share(bill.spot, 1.0),
        "cost_per_million_tokens": bill.per_million(bill.on_demand, bill.tokens),
        "cost_per_million_tokens_spot": bill.per_million(bill.spot, bill.tokens),
        "cost_per_million_output_tokens": bill.per_million(bill.on_demand, totals.completion_tokens),
        "cost_per_million_output_tokens_spot": bill.per_million(bill.spot, totals.completion_tokens),
        "cost_per_million_rows": bill.per_million(bill.on_demand, totals.rows),
        "cost_per_million_rows_spot": bill.per_million(bill.spot, totals.rows),
    }


def _gpu_figures(time: EngineTime) -> dict:
    return {
        "gpu_name": time.gpu_name,
        "gpu_count": time.gpu_count,
        "gpu_telemetry": time.gpu_telemetry,
        "gpu_utilization_mean": time.gpu_utilization_mean,
        "gpu_memory_mib_mean": time.gpu_memory_mib_mean,
        "gpu_power_w_mean": time.gpu_power_w_mean,
    }


def _projection(totals: RowTotals, time: EngineTime, rate: Rate, rows: int) -> dict:
    rows_per_second = totals.rows / time.span_seconds if time.span_seconds else None

    def projected(per_hour: float | None) -> float | None:
        if not rows_per_second or per_hour is None:
            return None
        return round(rows / rows_per_second / 3600 * max(time.slots, 1) * rate.count * per_hour, 4)

    return {
        "rows": rows,
        "hours": round(rows / rows_per_second / 3600, 3) if rows_per_second else None,
        "cost_on_demand": projected(rate.on_demand),
        "cost_spot": projected(rate.spot),
    }


def _validation_figures(run_dir: RunDir, rate: Rate) -> dict:
    """The canary checks' verdict of this run, if one was written after its plan."""
    if not (
        run_dir.validation.exists() and run_dir.validation.stat().st_mtime >= run_dir.plan_manifest.stat().st_mtime
    ):
        return {}
    verdict = Verdict.load(run_dir.validation)
    return {
        "validated": verdict.validated,
        "validation_state": verdict.verdict,
        "validation_failures": verdict.failures,
        "validation_seconds": verdict.seconds,
        # what the checks cost, at the accelerator's price (the re-run holds the engine meanwhile)
        "validation_cost_on_demand": round((verdict.seconds or 0) / 3600 * rate.count * rate.on_demand, 6)
        if rate.priced
        else None,
        "validation_checks": verdict.summaries(),
    }


def _errors_by_code(run_dir: RunDir) -> dict[str, int]:
    return RunReport.load(run_dir.summary).errors_by_code if run_dir.summary.exists() else {}


def _token_share(share: ModelRows, total: int) -> float:
    """A model's part of the engine's work (and so of the bill): its tokens over the run's."""
    return (share.prompt_tokens + share.completion_tokens) / total if total else 0.0


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
        timeline, source = _chunk_landings(run_dir), "tokens in chunk files as they landed"
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


def _chunk_landings(run_dir: RunDir) -> dict[int, int]:
    chunks = run_dir.every_chunk()
    if not chunks:
        return {}
    with local_copies(chunks) as chunks, duckdb_connection() as con:
        rows = con.sql(
            f"""SELECT {RunDir.CHUNK_SECOND_SQL} AS second,
                       sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))::BIGINT
                FROM read_parquet({sql_path_list(chunks)}, filename = true) GROUP BY 1"""
        ).fetchall()
    return dict(rows)


def write_report(
    run_dir: RunDir, pricing: GpuPricing | None = None, managed: ManagedApiPrices | None = None
) -> CostReport:
    report = build_report(run_dir, pricing, managed)
    chart = render_chart(run_dir, run_dir.report_chart)
    report.save(run_dir.report_json)
    with written_whole(run_dir.report_markdown) as tmp:
        tmp.write_text(render_markdown(report, chart.name if chart else None))
    return report


def trend(root: Path) -> list[dict]:
    """One row per run under `root` that has a report, oldest first: the nightly trend."""
    reports = sorted(RunDir.reports_under(root), key=lambda p: p.stat().st_mtime)
    if not reports:
        return []
    with duckdb_connection() as con:
        rel = con.sql(
            f"""
            SELECT run_dir, rows, failed, total_tokens, tokens_per_second, output_tokens_per_second,
                   cost_per_million_tokens, cost_per_million_tokens_spot, gpu_utilization_mean, truncation_share
            FROM read_json_auto({sql_path_list(reports)}, union_by_name = true, filename = true)
            ORDER BY list_position({sql_path_list(reports)}, filename)
            """
        )
        columns = rel.columns
        return [dict(zip(columns, row)) for row in rel.fetchall()]


@task(name="cost-report")
def cost_report(run_dir: str, pricing: GpuPricing | None = None, managed: ManagedApiPrices | None = None) -> CostReport:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rd = RunDir(run_dir)
    report = write_report(rd, pricing, managed)
    key = re.sub(r"[^a-z0-9-]+", "-", rd.root.name.lower()).strip("-") or "run"
    create_markdown_artifact(
        key=f"nightshift-report-{key}",
        markdown=artifact_markdown(rd),
        description="Nightshift cost and throughput report",
    )
    table = {k: v for k, v in report.figures().items() if not isinstance(v, (dict, list))}
    create_table_artifact(key=f"nightshift-figures-{key}", table=[table], description="Nightshift run figures")
    get_run_logger().info(cost_line(report))
    record_report(run_dir, report)  # run by the flow as the report asset's materializing task
    return report


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
