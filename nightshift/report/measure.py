"""What a run measured, as plain SQL over its files: its rows (`results.parquet` once merged, else
the shards' chunk files), its engines' time and GPUs (the shards' `metrics.json`), when rows
finished (for the chart), and the nightly trend across runs. No money here: see `price`."""

from __future__ import annotations

import statistics
from pathlib import Path

from nightshift.config import JobSpec
from nightshift.records import EngineTime, ModelRows, Politeness, RowTotals, RunReport, ShardMetrics
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, local_copies, sql_path
from nightshift.stages.chunks import best_rows_sql, chunk_files, sql_path_list


def politeness(run_dir: RunDir, job: JobSpec) -> Politeness | None:
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
        online_ttft_ms_p50=quantile(ttfts, 0.5),
        online_ttft_ms_p95=quantile(ttfts, 0.95),
        over_objective=round(sum(t > objective for t in ttfts) / len(ttfts), 4) if ttfts else 0.0,
        in_flight_min=limits[0],
        in_flight_median=statistics.median(limits),
        in_flight_max=limits[-1],
    )


def quantile(ordered: list[float], q: float) -> float | None:
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


def errors_by_code(run_dir: RunDir) -> dict[str, int]:
    return RunReport.load(run_dir.summary).errors_by_code if run_dir.summary.exists() else {}


def chunk_landings(run_dir: RunDir) -> dict[int, int]:
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
