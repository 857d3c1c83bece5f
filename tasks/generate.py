"""Generate stage: run one shard's rows through the process's shared vLLM engine.

Checkpoints, two levels:

* the task's Prefect cache key is the shard's content hash plus the job fingerprint (model
  identity, sampling-relevant settings, output format version): a finished shard comes back
  Cached on a re-run and is never generated again;
* inside a shard, finished rows are written in chunk files of `chunk_size` rows, each written
  atomically (temp file + rename). A restarted shard reads which rows its chunk files already
  hold and generates only the others, so a kill loses at most the rows finished since the last
  chunk file (fewer than `chunk_size`) plus the rows in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.context import TaskRunContext

from nightshift.engine import get_engine
from nightshift.openai_format import (
    PreparedRequest,
    RequestRejected,
    error_line,
    output_line,
    prepare_request,
)
from nightshift.preemption import Preempted, generation_in_progress, grace_seconds, stop_requested
from nightshift.records import JobSpec, Shard, ShardResult, _write_json_atomic
from nightshift.rundir import RunDir

CHUNK_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("shard", pa.int32()),
        ("custom_id", pa.string()),
        ("ok", pa.bool_()),
        ("line", pa.string()),  # the output.jsonl or errors.jsonl line
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error_code", pa.string()),
    ]
)


def shard_cache_key(shard: Shard, job: JobSpec) -> str:
    return f"{shard.content_hash[:32]}-{job.fingerprint()[:16]}"


def _task_cache_key(context: TaskRunContext, parameters: dict) -> str:
    return shard_cache_key(parameters["shard"], parameters["job"])


def _retry_unless_preempted(task, task_run, state) -> bool:
    # A preempted process is going away: retrying inside it would only be killed again.
    return not isinstance(state.result(raise_on_failure=False), Preempted)


@task(
    name="generate-shard",
    cache_key_fn=_task_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_unless_preempted,
)
def generate_shard(shard: Shard, job: JobSpec, run_dir: str) -> ShardResult:
    return generate(shard, job, RunDir(run_dir))


def chunk_files(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("chunk-*.parquet"))


def rows_on_disk(output_dir: Path) -> set[int]:
    files = chunk_files(output_dir)
    if not files:
        return set()
    return set(pq.read_table(files, columns=["row_index"])["row_index"].to_pylist())


def generate(shard: Shard, job: JobSpec, run_dir: RunDir) -> ShardResult:
    with generation_in_progress():
        return _generate(shard, job, run_dir)


def _generate(shard: Shard, job: JobSpec, run_dir: RunDir) -> ShardResult:
    started = time.monotonic()
    key = shard_cache_key(shard, job)
    output_dir = run_dir.shard_output(key)
    output_dir.mkdir(parents=True, exist_ok=True)
    done = rows_on_disk(output_dir)
    todo = [row for row in pq.read_table(shard.path).to_pylist() if row["row_index"] not in done]
    writer = _ChunkWriter(output_dir, shard.index, job.chunk_size, key)

    to_generate: list[PreparedRequest] = []
    engine = None
    for row in todo:
        if row["error"] is not None:
            writer.add_error(row, json.loads(row["error"]))
            continue
        if engine is None:
            engine = get_engine(job.engine)  # only when some row needs it
        try:
            to_generate.append(
                prepare_request(
                    row["row_index"],
                    row["custom_id"],
                    json.loads(row["request"]),
                    job.served_model_name,
                    _model_aliases(job),
                    job.model_mismatch,
                    engine.default_sampling_params,
                )
            )
        except RequestRejected as exc:
            writer.add_error(row, {"code": exc.code, "message": str(exc), "line": row["line_no"]})

    by_index = {row["row_index"]: row for row in todo}
    try:
        if to_generate:
            for request, outcome in engine.generate(to_generate, stop_requested, grace_seconds()):
                row = by_index[request.key]
                if isinstance(outcome, Exception):
                    writer.add_error(row, _engine_refusal(outcome, row["line_no"]))
                else:
                    writer.add_output(row, request.kind, outcome, job.served_model_name, engine.tokenizer)
    finally:
        writer.flush()  # finished rows survive a preemption or an engine fault
    if stop_requested.is_set():
        raise Preempted(f"shard {shard.index}: stopped on SIGTERM")

    files = chunk_files(output_dir)
    table = pq.read_table(files, columns=["row_index", "ok", "prompt_tokens", "completion_tokens"])
    if table.num_rows != shard.num_rows or len(set(table["row_index"].to_pylist())) != shard.num_rows:
        raise RuntimeError(f"shard {shard.index}: {table.num_rows} rows on disk, {shard.num_rows} planned")
    ok = table["ok"].to_pylist()
    result = ShardResult(
        shard_index=shard.index,
        cache_key=key,
        output_dir=str(output_dir),
        chunk_files=[str(f) for f in files],
        chunk_sha256=[file_sha256(f) for f in files],
        rows=shard.num_rows,
        succeeded=sum(ok),
        failed=len(ok) - sum(ok),
        prompt_tokens=sum(v or 0 for v in table["prompt_tokens"].to_pylist()),
        completion_tokens=sum(v or 0 for v in table["completion_tokens"].to_pylist()),
        regenerated_rows=len(to_generate),
        wall_seconds=round(time.monotonic() - started, 3),
    )
    _write_json_atomic(output_dir / "result.json", result.__dict__)
    return result


def checkpoint_intact(result: ShardResult) -> bool:
    """A cached result is only as good as its files: every chunk present, bytes unchanged.

    A chunk whose bytes changed is removed, so regenerating the shard redoes its rows.
    """
    intact = True
    for path, digest in zip(result.chunk_files, result.chunk_sha256):
        path = Path(path)
        if not path.exists():
            intact = False
        elif file_sha256(path) != digest:
            path.unlink()
            intact = False
    return intact


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_aliases(job: JobSpec) -> set[str]:
    model = job.engine.model
    return {job.served_model_name, model, os.path.basename(model.rstrip("/"))}


def _engine_refusal(exc: Exception, line_no: int) -> dict:
    message = str(exc)
    code = "context_length_exceeded" if "context length" in message else "invalid_request"
    return {"code": code, "message": message, "line": line_no}


class _ChunkWriter:
    """Buffers finished rows and writes them `chunk_size` at a time, atomically."""

    def __init__(self, output_dir: Path, shard_index: int, chunk_size: int, cache_key: str) -> None:
        self.output_dir = output_dir
        self.shard_index = shard_index
        self.chunk_size = chunk_size
        self.cache_key = cache_key
        self.buffer: list[dict] = []

    def add_output(self, row: dict, kind: str, output, model_name: str, tokenizer) -> None:
        line = output_line(row["custom_id"], kind, output, model_name, self.cache_key, tokenizer)
        first = output.outputs[0]
        usage = line["response"]["body"]["usage"]
        self._add(row, line, ok=True, text=first.text, finish_reason=first.finish_reason,
                  prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                  error_code=None)

    def add_error(self, row: dict, error: dict) -> None:
        line = error_line(row["custom_id"], error, self.cache_key)
        self._add(row, line, ok=False, text=None, finish_reason=None,
                  prompt_tokens=None, completion_tokens=None, error_code=error["code"])

    def _add(self, row: dict, line: dict, **fields) -> None:
        self.buffer.append(
            {
                "row_index": row["row_index"],
                "shard": self.shard_index,
                "custom_id": row["custom_id"],
                "line": json.dumps(line, ensure_ascii=False),
                **fields,
            }
        )
        if len(self.buffer) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        records = sorted(self.buffer, key=lambda r: r["row_index"])
        self.buffer = []
        # Unique names: a chunk never overwrites another, whoever else writes this shard.
        path = self.output_dir / f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(records, schema=CHUNK_SCHEMA), tmp)
        os.replace(tmp, path)  # a chunk file either is whole or does not exist
