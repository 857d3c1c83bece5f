"""The chunk file: the unit in which generated rows reach the disk.

A shard's output directory holds chunk files `chunk-<time_ns>-<random>.parquet`, each written
whole under a temporary name and renamed. Here too: a shard's output directory name
(`shard_cache_key`), the writer that fills chunks, the suspects file of rows an engine died
under, and the checksums a checkpoint is verified by. A row may appear in more than one chunk
after `nightshift retry` (a failed row retried) or a duplicated straggler; readers take its
best outcome: a success over an error, then the most recent.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nightshift.config import JobSpec
from nightshift.records import Shard, ShardResult
from nightshift.runtime import progress
from nightshift.runtime.deadline import EXPIRED_CODE
from nightshift.runtime.rundir import RunDir, write_json_atomic
from nightshift.runtime.storage import duckdb_connection, local_copies, location, read_table, written_whole
from nightshift.wire.lines import BatchLine
from nightshift.wire.openai_format import (
    RemoteCompletion,
    RemoteEmbedding,
    as_response,
    embedding_output_line,
    embedding_vectors,
    error_line,
    output_line,
    remote_output_line,
)

CHUNK_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("shard", pa.int32()),
        ("custom_id", pa.string()),
        ("ok", pa.bool_()),
        ("line", pa.string()),  # the output.jsonl or errors.jsonl line (null: a corpus row's vector only)
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error_code", pa.string()),
        # "engine"; "duplicate": an identical deterministic row's output; "cache": the result cache's
        ("source", pa.string()),
        ("embedding", pa.list_(pa.float32())),  # an embedding row's (first) vector
        ("model", pa.string()),  # the LoRA adapter a row was generated with; null: the base model
        ("image_tokens", pa.int64()),  # of its prompt tokens, those its images became
        # a sampled row's first answer tokens, as the engine made them, kept for the canary stage's
        # plausibility check (its text may not re-tokenize to them): KEPT_TOKENS rows' worth
        ("token_ids", pa.list_(pa.int32())),
        # of its prompt tokens, those the engine's prefix cache served (null: the engine did not say)
        ("cached_tokens", pa.int64()),
    ]
)
KEPT_TOKENS = 32  # the first tokens of a sampled row kept: the oracle scores 16 by default
KEEP_EVERY = 64  # …of the run's first 64 rows (input order) and every 64th row after


def kept_token_ids(row_index: int, request, completion) -> list[int] | None:
    """A sampled row's first answer tokens, for the first and every KEEP_EVERY-th row of the run
    (a systematic sample costs a run of millions some kilobytes); None for any other row."""
    params = request.sampling_params
    sampled = (getattr(params, "temperature", 0) or 0) > 0
    if not sampled or (row_index >= KEEP_EVERY and row_index % KEEP_EVERY) or completion.token_ids is None:
        return None
    return list(completion.token_ids[:KEPT_TOKENS])


# Errors worth another attempt: the engine failed, or the run's deadline came first; not the request.
RETRYABLE_CODES = ("engine_error", EXPIRED_CODE)


def _image_tokens(output, image_token_id) -> int | None:
    ids = getattr(output, "prompt_token_ids", None)
    return None if image_token_id is None or ids is None else sum(1 for token in ids if token == image_token_id)


def chunk_files(output_dir: Path) -> list[Path]:
    return RunDir.chunks(output_dir)


def write_chunk(output_dir: Path, records: list[dict]) -> Path:
    path = RunDir.new_chunk(output_dir)
    with written_whole(path) as tmp:  # a chunk file either is whole or does not exist
        pq.write_table(pa.Table.from_pylist(sorted(records, key=lambda r: r["row_index"]), schema=CHUNK_SCHEMA), tmp)
    return path


def sql_path_list(files) -> str:
    """A DuckDB list literal of file paths, quotes escaped."""
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def best_rows_sql(files: list[str | Path]) -> str:
    """SQL selecting each row's best outcome across `files` (see module docstring)."""
    return f"""
        SELECT * EXCLUDE (filename) FROM read_parquet({sql_path_list(files)}, filename = true, union_by_name = true)
        QUALIFY row_number() OVER (PARTITION BY row_index ORDER BY ok DESC, filename DESC) = 1
    """


def rows_on_disk(output_dir: Path) -> set[int]:
    """Rows that already have an outcome (output or error) in a chunk file."""
    files = chunk_files(output_dir)
    if not files:
        return set()
    return set(read_table(files, columns=["row_index"])["row_index"].to_pylist())


def retryable_rows(output_dir: Path) -> set[int]:
    """Rows whose best outcome is a retryable error."""
    files = chunk_files(output_dir)
    if not files:
        return set()
    codes = ", ".join(f"'{c}'" for c in RETRYABLE_CODES)
    with local_copies(files) as files, duckdb_connection() as con:
        found = con.sql(f"SELECT row_index FROM ({best_rows_sql(files)}) WHERE NOT ok AND error_code IN ({codes})")
        return {row[0] for row in found.fetchall()}


def shard_cache_key(shard: Shard, job: JobSpec) -> str:
    return f"{shard.content_hash[:32]}-{job.fingerprint()[:16]}"


def checkpoint_intact(result: ShardResult) -> bool:
    """A cached result is only as good as its files: every chunk present, bytes unchanged.

    A chunk whose bytes changed is removed, so regenerating the shard redoes its rows.
    """
    intact = True
    for path, digest in zip(result.chunk_files, result.chunk_sha256):
        path = location(path)
        if not path.exists():
            intact = False
        elif file_sha256(path) != digest:
            path.unlink()
            intact = False
    return intact


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with location(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Suspects:
    """Rows the engine died under, with how often; kept beside the shard's chunks."""

    def __init__(self, output_dir: Path) -> None:
        self.path = RunDir.shard_suspects(output_dir)
        self.counts: dict[int, int] = (
            {int(k): v for k, v in json.loads(self.path.read_text()).items()} if self.path.exists() else {}
        )

    def deaths(self, row_index: int) -> int:
        return self.counts.get(row_index, 0)

    def record(self, row_indexes: list[int]) -> None:
        for row_index in row_indexes:
            self.counts[row_index] = self.counts.get(row_index, 0) + 1
        write_json_atomic(self.path, self.counts)

    def forgive(self, row_indexes: set[int]) -> None:
        if any(r in self.counts for r in row_indexes):
            self.counts = {r: n for r, n in self.counts.items() if r not in row_indexes}
            write_json_atomic(self.path, self.counts)


class ChunkWriter:
    """Buffers finished rows and writes them `chunk_size` at a time."""

    def __init__(self, output_dir: Path, shard_index: int, chunk_size: int, cache_key: str, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.output_dir = output_dir
        self.shard_index = shard_index
        self.chunk_size = chunk_size
        self.cache_key = cache_key
        self.buffer: list[dict] = []
        self.tokens_written = 0
        self.timeline: dict[int, int] = {}  # second → tokens of rows the engine finished in it
        self.engine_prompt_tokens = 0  # prompt tokens of the rows the engine ran, and those
        self.cached_prompt_tokens = 0  # its prefix cache served: the measured hit rate

    def add_output(
        self, row: dict, request, output, tokenizer, source: str = "engine", tool_calling=None, image_token_id=None
    ) -> dict:
        """A chat or completions row's answer (`request`: its PreparedRequest; `image_token_id`:
        the token a vision model's prompt holds for each piece of an image)."""
        kind, model_name = request.kind, request.model_name
        if isinstance(output, RemoteCompletion):  # an engine server's answer: its own body
            line = remote_output_line(row["custom_id"], kind, output, model_name, self.cache_key)
        else:
            line = output_line(
                row["custom_id"], kind, output, model_name, self.cache_key, tokenizer, tool_calling, request.parsed
            )
        finish_reason = line.body["choices"][0]["finish_reason"]
        first = output.outputs[0]
        usage = line.body["usage"]
        cached = getattr(output, "num_cached_tokens", None)
        if source == "engine":
            self.engine_prompt_tokens += usage["prompt_tokens"]
            self.cached_prompt_tokens += cached or 0
        if request.responses is not None:
            line = as_response(line, request.responses)
        return self._add(
            row,
            line,
            ok=True,
            text=first.text,
            finish_reason=finish_reason,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            error_code=None,
            source=source,
            model=request.adapter,
            image_tokens=_image_tokens(output, image_token_id) if request.images else None,
            token_ids=kept_token_ids(row["row_index"], request, first),
            cached_tokens=cached if source == "engine" else _cached_in(usage),
        )

    def add_embedding(self, row: dict, request, outputs: list | RemoteEmbedding, source: str = "engine") -> dict:
        """An embedding row: its vectors, in an OpenAI output line or (a corpus row) alone."""
        limit = (request.tokenization_kwargs or {}).get("max_length")
        if isinstance(outputs, RemoteEmbedding):  # a server counts one row's tokens, not each input's
            vectors, prompt_tokens = outputs.vectors, outputs.prompt_tokens
            truncated = limit is not None and len(vectors) == 1 and prompt_tokens >= limit
        else:
            vectors = embedding_vectors(outputs)
            prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
            truncated = limit is not None and any(len(o.prompt_token_ids or []) >= limit for o in outputs)
        line = (
            None
            if request.vector_only
            else embedding_output_line(
                row["custom_id"], vectors, prompt_tokens, request.encoding_format, request.model_name, self.cache_key
            )
        )
        return self._add(
            row,
            line,
            ok=True,
            text=None,
            finish_reason="length" if truncated else "stop",  # "length": cut to the model's limit
            prompt_tokens=prompt_tokens,
            completion_tokens=0,
            error_code=None,
            source=source,
            embedding=vectors[0],
        )

    def add_stored(self, row: dict, line: BatchLine, stored: dict, adapter: str | None = None) -> None:
        """A row answered from the result cache (`adapter`: the one its request names)."""
        self._add(
            row,
            line,
            ok=True,
            text=stored["text"],
            finish_reason=stored["finish_reason"],
            prompt_tokens=stored["prompt_tokens"],
            completion_tokens=stored["completion_tokens"],
            error_code=None,
            source="cache",
            model=adapter,
        )

    def add_error(self, row: dict, error: dict) -> None:
        line = error_line(row["custom_id"], error, self.cache_key)
        self._add(
            row,
            line,
            ok=False,
            text=None,
            finish_reason=None,
            prompt_tokens=None,
            completion_tokens=None,
            error_code=error["code"],
            source=None,
        )

    def _add(self, row: dict, line: BatchLine | None, **fields) -> dict:
        record = {
            "row_index": row["row_index"],
            "shard": self.shard_index,
            "custom_id": row["custom_id"],
            "line": None if line is None else json.dumps(line.wire(), ensure_ascii=False),
            "embedding": None,
            "model": None,
            "image_tokens": None,
            "token_ids": None,
            "cached_tokens": None,
            **fields,
        }
        self.buffer.append(record)
        tokens = (fields["prompt_tokens"] or 0) + (fields["completion_tokens"] or 0)
        if fields["source"] == "engine":
            second = int(time.time())
            self.timeline[second] = self.timeline.get(second, 0) + tokens
        # Progress moves by the row, whatever the chunk size; the chunk file (below) is what a
        # kill keeps, and what `nightshift status` counts as checkpointed.
        progress.advance(self.run_dir, 1, tokens)
        if len(self.buffer) >= self.chunk_size:
            self.flush()
        return record

    def flush(self) -> None:
        if self.buffer:
            write_chunk(self.output_dir, self.buffer)
            self.tokens_written += sum(
                (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
                for r in self.buffer
                if r["source"] == "engine"
            )
            self.buffer = []


def _cached_in(usage: dict) -> int | None:
    """The cached prompt tokens an output line's usage says (a row answered by an identical row
    or the result cache repeats the line that was generated)."""
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
