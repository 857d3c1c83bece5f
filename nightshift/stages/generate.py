"""Generate stage: run one shard's rows through the process's shared vLLM engine.

Checkpoints, two levels:

* the task's Prefect cache key is the shard's content hash plus the job fingerprint (model
  identity, sampling-relevant settings, output format version): a finished shard comes back
  Cached on a re-run and is never generated again;
* inside a shard, finished rows are written in chunk files of `chunk_size` rows, each written
  atomically. A restarted shard reads which rows its chunk files already hold and generates
  only the others, so a kill loses at most the rows finished since the last chunk file (fewer
  than `chunk_size`) plus the rows in flight.

Engine faults: when the engine dies, the rows it was generating are recorded as suspects and
the task fails, so Prefect retries it on a fresh engine. Suspects then run one at a time; a
row under which the engine dies twice is reported as an `engine_error` instead of being
retried forever (`nightshift retry` gives such rows another chance later).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from nightshift.config import JobSpec
from nightshift.engine.local import EngineFailure, get_engine
from nightshift.engine.protocol import Engine
from nightshift.engine.sizing import throughput_traps
from nightshift.engine.tool_calls import ToolCalling
from nightshift.errors import DeadlineReached, Preempted
from nightshift.models import local_model
from nightshift.observe.telemetry import GpuSampler
from nightshift.records import Shard, ShardMetrics, ShardResult
from nightshift.runtime.deadline import StopSignal, deadline_reached
from nightshift.runtime.preemption import generation_in_progress, grace_seconds, stop_requested
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, local_copies, read_table
from nightshift.stages.chunks import (
    ChunkWriter,
    Suspects,
    best_rows_sql,
    chunk_files,
    file_sha256,
    rows_on_disk,
    shard_cache_key,
)
from nightshift.stages.layout import expected_work, prefix_order
from nightshift.stages.result_cache import ResultCache, cached_output_line
from nightshift.wire.media import MediaPolicy
from nightshift.wire.openai_format import PreparedRequest, RequestRejected, ServedModels, duplicate_key, prepare_request


def _story():
    """The Prefect run's logger inside a run; the module's logger elsewhere (benchmarks)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("nightshift.generate")


def generate(shard: Shard, job: JobSpec, run_dir: RunDir, only_rows: set[int] | None = None) -> ShardResult:
    """Generate the rows of `shard` that have no outcome on disk yet — or, with `only_rows`,
    exactly those rows again (their new outcomes supersede the old ones)."""
    with generation_in_progress():
        return _generate(shard, job, run_dir, only_rows)


def _generate(shard: Shard, job: JobSpec, run_dir: RunDir, only_rows: set[int] | None) -> ShardResult:
    if deadline_reached.is_set():
        raise DeadlineReached(f"shard {shard.index}: not started before the run's deadline")
    started = time.monotonic()
    key = shard_cache_key(shard, job)
    output_dir = run_dir.shard_output(key)  # written whole, file by file: no directory to make
    todo = _rows_to_do(read_table(shard.path).to_pylist(), output_dir, only_rows)
    suspects = Suspects(output_dir)
    if only_rows is not None:
        suspects.forgive(only_rows)
    writer = ChunkWriter(output_dir, shard.index, job.chunk_size, key, run_dir)
    engine, ready_rows = _prepare(todo, job, run_dir, writer, suspects)
    work = _Work.of(ready_rows, todo, job, key, writer)

    engine_started = time.time()
    with GpuSampler() as sampler:
        try:
            _answer(work, engine, job, writer, suspects, shard)
        finally:
            writer.flush()  # finished rows survive a preemption or an engine fault
            if work.cache is not None:
                work.cache.flush(key)
    engine_finished = time.time()
    if stop_requested.is_set():
        raise Preempted(f"shard {shard.index}: stopped on SIGTERM")
    result = _shard_result(shard, key, output_dir, len(work.to_generate), time.monotonic() - started)
    result.save(RunDir.shard_result(output_dir))
    write_shard_metrics(
        result,
        output_dir,
        engine_started,
        engine_finished,
        sampler,
        writer,
        engine,
    )
    return result


def _rows_to_do(rows: list[dict], output_dir: Path, only_rows: set[int] | None) -> list[dict]:
    """The shard's rows with no outcome on disk yet — or exactly `only_rows`, to be redone."""
    if only_rows is None:
        done = rows_on_disk(output_dir)
        return [row for row in rows if row["row_index"] not in done]
    return [row for row in rows if row["row_index"] in only_rows]


def _prepare(todo: list[dict], job: JobSpec, run_dir: RunDir, writer: ChunkWriter, suspects: Suspects):
    """Each row either settled now — a planning error, a row set aside after killing the engine
    twice, a request the engine's limits reject — or prepared for the engine, with the key that
    identical rows share. The engine is started only when some row needs it."""
    ready_rows: list[tuple[PreparedRequest, str | None]] = []
    engine: Engine | None = None
    media = MediaPolicy.of_job(job)  # what the rows' images may name
    for row in todo:
        if row["error"] is not None:
            writer.add_error(row, json.loads(row["error"]))
            continue
        if suspects.deaths(row["row_index"]) >= 2:
            message = "the engine died twice while generating this row; it was set aside"
            writer.add_error(row, {"code": "engine_error", "line": row["line_no"], "message": message})
            continue
        if engine is None:  # an s3:// model must still be the job's
            local_model(job.engine.model, job.model_identity)
            engine = get_engine(job.engine)
            if str(run_dir.root) not in engine.announced:
                engine.announced.add(str(run_dir.root))
                _story().info(engine.describe())
                for trap in throughput_traps(engine.settings, GpuSampler().gpu_count > 0):
                    _story().warning(trap)
        request = json.loads(row["request"])
        try:
            ready = prepare_request(
                row["row_index"],
                row["custom_id"],
                request,
                ServedModels.of_job(job),
                engine.default_sampling_params,
                engine.max_model_len,
                engine.runner_type,
                engine.model_config,
                ToolCalling.for_engine(engine, job.tool_call_parser),
                media,
            )
        except RequestRejected as exc:
            writer.add_error(row, {"code": exc.code, "message": str(exc), "line": row["line_no"]})
            continue
        ready_rows.append((ready, duplicate_key(request, ready)))
    return engine, ready_rows


@dataclass
class _Work:
    """What the engine must generate, once the cheapest tokens — those not generated — are had:
    a deterministic row answered from the result cache, or by an identical row already on its
    way to the engine."""

    by_index: dict[int, dict]
    to_generate: list[PreparedRequest]
    copies: dict[int, list[PreparedRequest]]  # a generated row's key → identical rows that take its output
    shared_key: dict[int, str]  # a generated row's key → the key its identical rows and the cache know it by
    cache: ResultCache | None

    @classmethod
    def of(cls, ready_rows, todo: list[dict], job: JobSpec, key: str, writer: ChunkWriter) -> _Work:
        by_index = {row["row_index"]: row for row in todo}
        cache = ResultCache(job.result_cache, job.output_fingerprint()) if job.result_cache else None
        stored = cache.lookup([cache.key(same) for _, same in ready_rows if same]) if cache else {}
        work = cls(by_index, [], {}, {}, cache)
        first_of: dict[str, PreparedRequest] = {}
        for ready, same in ready_rows:
            if same is not None and cache is not None and cache.key(same) in stored:
                row, line = by_index[ready.key], stored[cache.key(same)]
                writer.add_stored(row, cached_output_line(row["custom_id"], key, line), line, ready.adapter)
            elif same is not None and same in first_of:
                work.copies.setdefault(first_of[same].key, []).append(ready)
            else:
                if same is not None:
                    first_of[same] = ready
                    work.shared_key[ready.key] = same
                work.to_generate.append(ready)
        return work


def _answer(work: _Work, engine: Engine, job: JobSpec, writer: ChunkWriter, suspects: Suspects, shard: Shard) -> None:
    """Generate `work` on the engine, each outcome written for its row and the rows identical to it."""
    # Suspects first and alone: if one kills the engine again, it alone is blamed.
    batches = [[r] for r in work.to_generate if suspects.deaths(r.key)]
    rest = [r for r in work.to_generate if not suspects.deaths(r.key)]
    if rest and not job.keep_order and engine.runner_type == "generate":  # pooling reuses no KV cache
        # rows sharing a prompt prefix run while it is cached, the longest work first
        rest = prefix_order(rest, work_of=lambda request: expected_work(request.sampling_params.max_tokens))
    batches.append(rest)
    stop = StopSignal(stop_requested, deadline_reached)
    try:
        for batch in batches:
            if not batch:
                continue
            for request, outcome in engine.generate(batch, stop, _grace_s):
                for answered in [request, *work.copies.get(request.key, ())]:
                    _write_outcome(work, answered, request, outcome, engine, job, writer)
    except EngineFailure as exc:
        suspects.record(exc.in_flight)
        raise
    except Preempted:
        if stop_requested.is_set():
            raise
        raise DeadlineReached(f"shard {shard.index}: stopped at the run's deadline") from None


def _grace_s() -> float:
    """What the rows in flight get once generation stops: on SIGTERM the grace period (a spot VM's
    notice, for rows about to finish); at the deadline nothing — the window is the user's, a row
    finished past it is late, and those in flight end `batch_expired` with the rest."""
    return grace_seconds() if stop_requested.is_set() else 0.0


def _write_outcome(work: _Work, answered, request, outcome, engine: Engine, job: JobSpec, writer: ChunkWriter) -> None:
    row = work.by_index[answered.key]
    if isinstance(outcome, Exception):
        writer.add_error(row, _engine_refusal(outcome, row["line_no"]))
        return
    source = "engine" if answered is request else "duplicate"
    if answered.kind == "embedding":
        writer.add_embedding(row, answered, outcome, source)
        return
    tool_calling = ToolCalling.for_engine(engine, job.tool_call_parser) if answered.parsed is not None else None
    image_token_id = getattr(engine, "image_token_id", None)
    record = writer.add_output(row, answered, outcome, engine.tokenizer, source, tool_calling, image_token_id)
    if work.cache is not None and source == "engine" and request.key in work.shared_key:
        work.cache.add(work.cache.key(work.shared_key[request.key]), request.kind, record)


def finished_result(shard: Shard, job: JobSpec, run_dir: RunDir) -> ShardResult:
    """The ShardResult of a shard whose rows are all on disk, read back from its chunks."""
    output_dir = run_dir.shard_output(shard_cache_key(shard, job))
    return _shard_result(shard, shard_cache_key(shard, job), output_dir, 0, 0.0)


def _shard_result(shard: Shard, key: str, output_dir: Path, generated: int, seconds: float) -> ShardResult:
    files = chunk_files(output_dir)
    with local_copies(files) as local, duckdb_connection() as con:
        rows, distinct, succeeded, prompt_tokens, completion_tokens = con.sql(
            f"""
            SELECT count(*), count(DISTINCT row_index), count(*) FILTER (WHERE ok),
                   coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
            FROM ({best_rows_sql(local)})
            """
        ).fetchall()[0]
        digests = [file_sha256(f) for f in local]
    if distinct != shard.num_rows:
        raise RuntimeError(f"shard {shard.index}: {distinct} rows on disk, {shard.num_rows} planned")
    return ShardResult(
        shard_index=shard.index,
        cache_key=key,
        output_dir=str(output_dir),
        chunk_files=[str(f) for f in files],
        chunk_sha256=digests,
        rows=shard.num_rows,
        succeeded=succeeded,
        failed=rows - succeeded,
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        regenerated_rows=generated,
        wall_seconds=round(seconds, 3),
    )


def write_shard_metrics(
    result: ShardResult,
    output_dir: Path,
    engine_started: float,
    engine_finished: float,
    sampler: GpuSampler,
    writer: ChunkWriter,
    engine=None,
) -> None:
    """metrics.json beside the shard's chunks: what this attempt did, what it cost, and the GPU."""
    with local_copies(result.chunk_files) as files, duckdb_connection() as con:
        finish = dict(
            con.sql(
                f"SELECT coalesce(finish_reason, 'error'), count(*) FROM ({best_rows_sql(files)}) GROUP BY 1"
            ).fetchall()
        )
        errors = dict(
            con.sql(f"SELECT error_code, count(*) FROM ({best_rows_sql(files)}) WHERE NOT ok GROUP BY 1").fetchall()
        )
    engine_seconds = max(engine_finished - engine_started, 1e-9)
    ShardMetrics(
        shard_index=result.shard_index,
        cache_key=result.cache_key,
        rows=result.rows,
        generated_rows=result.regenerated_rows,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        wall_seconds=result.wall_seconds,
        engine_seconds=round(engine_seconds, 3),
        engine_started=engine_started,
        engine_finished=engine_finished,
        tokens_generated=writer.tokens_written,
        tokens_per_second=round(writer.tokens_written / engine_seconds, 2) if result.regenerated_rows else None,
        finish_reasons=finish,
        max_model_len=engine.max_model_len if engine else None,
        engine_settings=engine.settings if engine else None,
        errors_by_code=errors,
        token_timeline=sorted(writer.timeline.items()),  # the report's throughput chart
        engine_prompt_tokens=writer.engine_prompt_tokens,
        cached_prompt_tokens=writer.cached_prompt_tokens,
        politeness=engine.politeness_timeline(engine_started) if engine else None,
        **sampler.summary(),
    ).save(RunDir.shard_metrics(output_dir))


def _engine_refusal(exc: Exception, line_no: int) -> dict:
    message = str(exc)
    code = "context_length_exceeded" if "context length" in message else "invalid_request"
    if isinstance(exc, RequestRejected):  # found when the engine admitted the row: an image read then
        code = exc.code
    return {"code": code, "message": message, "line": line_no}
