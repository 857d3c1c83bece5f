"""Generate stage: run one shard's rows through the process's shared vLLM engine.

The task's Prefect cache key is the shard's content hash plus the job fingerprint (model
identity, sampling-relevant settings, output format version), so a finished shard comes
back Cached on a re-run and is never generated twice. Inside a shard, rows are written in
fixed chunks (rows [k·chunk_size, (k+1)·chunk_size) of the shard), each chunk file written
atomically; a restarted shard skips its complete chunks, so a kill costs the chunks that
were in flight, not the shard.
"""

from __future__ import annotations

import json
import os
import time
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


def chunk_path(output_dir: Path, chunk: int) -> Path:
    return output_dir / f"chunk-{chunk:05d}.parquet"


@task(
    name="generate-shard",
    cache_key_fn=_task_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=1,
)
def generate_shard(shard: Shard, job: JobSpec, run_dir: str) -> ShardResult:
    return generate(shard, job, RunDir(run_dir))


def generate(shard: Shard, job: JobSpec, run_dir: RunDir) -> ShardResult:
    started = time.monotonic()
    key = shard_cache_key(shard, job)
    output_dir = run_dir.shard_output(key)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(shard.path).to_pylist()
    chunks = [rows[i : i + job.chunk_size] for i in range(0, len(rows), job.chunk_size)]
    pending = [k for k in range(len(chunks)) if not chunk_path(output_dir, k).exists()]
    writer = _ChunkWriter(output_dir, shard, chunks, pending)

    to_generate: list[PreparedRequest] = []
    engine = None
    for k in pending:
        for row in chunks[k]:
            if row["error"] is not None:
                writer.add_error(row, json.loads(row["error"]), key)
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
                writer.add_error(row, {"code": exc.code, "message": str(exc), "line": row["line_no"]}, key)

    by_index = {row["row_index"]: row for k in pending for row in chunks[k]}
    if to_generate:
        for request, outcome in engine.generate(to_generate):
            row = by_index[request.key]
            if isinstance(outcome, Exception):
                writer.add_error(row, _engine_refusal(outcome, row["line_no"]), key)
            else:
                writer.add_output(row, request.kind, outcome, job.served_model_name, key, engine.tokenizer)
    writer.check_complete()

    files = [str(chunk_path(output_dir, k)) for k in range(len(chunks))]
    totals = pq.read_table(files, columns=["ok", "prompt_tokens", "completion_tokens"]).to_pydict() if files else {}
    ok = totals.get("ok", [])
    result = ShardResult(
        shard_index=shard.index,
        cache_key=key,
        output_dir=str(output_dir),
        chunk_files=files,
        rows=len(rows),
        succeeded=sum(ok),
        failed=len(ok) - sum(ok),
        prompt_tokens=sum(v or 0 for v in totals.get("prompt_tokens", [])),
        completion_tokens=sum(v or 0 for v in totals.get("completion_tokens", [])),
        regenerated_rows=len(to_generate),
        wall_seconds=round(time.monotonic() - started, 3),
    )
    _write_json_atomic(output_dir / "result.json", result.__dict__)
    return result


def _model_aliases(job: JobSpec) -> set[str]:
    model = job.engine.model
    return {job.served_model_name, model, os.path.basename(model.rstrip("/"))}


def _engine_refusal(exc: Exception, line_no: int) -> dict:
    message = str(exc)
    code = "context_length_exceeded" if "context length" in message else "invalid_request"
    return {"code": code, "message": message, "line": line_no}


class _ChunkWriter:
    """Collects finished rows per chunk and writes a chunk the moment its last row is in."""

    def __init__(self, output_dir: Path, shard: Shard, chunks: list[list[dict]], pending: list[int]) -> None:
        self.output_dir = output_dir
        self.shard = shard
        self.chunk_of = {}
        self.remaining = {}
        self.buffers: dict[int, list[dict]] = {}
        for k in pending:
            self.remaining[k] = len(chunks[k])
            self.buffers[k] = []
            for row in chunks[k]:
                self.chunk_of[row["row_index"]] = k

    def add_output(self, row: dict, kind: str, output, model_name: str, key: str, tokenizer) -> None:
        line = output_line(row["custom_id"], kind, output, model_name, key, tokenizer)
        first = output.outputs[0]
        usage = line["response"]["body"]["usage"]
        self._add(
            row,
            ok=True,
            line=line,
            text=first.text,
            finish_reason=first.finish_reason,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            error_code=None,
        )

    def add_error(self, row: dict, error: dict, key: str) -> None:
        line = error_line(row["custom_id"], error, key)
        self._add(row, ok=False, line=line, text=None, finish_reason=None,
                  prompt_tokens=None, completion_tokens=None, error_code=error["code"])

    def _add(self, row: dict, line: dict, **fields) -> None:
        k = self.chunk_of[row["row_index"]]
        self.buffers[k].append(
            {
                "row_index": row["row_index"],
                "shard": self.shard.index,
                "custom_id": row["custom_id"],
                "line": json.dumps(line, ensure_ascii=False),
                **fields,
            }
        )
        self.remaining[k] -= 1
        if self.remaining[k] == 0:
            self._write(k)

    def _write(self, k: int) -> None:
        records = sorted(self.buffers.pop(k), key=lambda r: r["row_index"])
        table = pa.Table.from_pylist(records, schema=CHUNK_SCHEMA)
        path = chunk_path(self.output_dir, k)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # a chunk file either is whole or does not exist

    def check_complete(self) -> None:
        missing = {k: n for k, n in self.remaining.items() if n}
        if missing:
            raise RuntimeError(f"shard {self.shard.index}: chunks {sorted(missing)} did not complete")
