"""Plan stage: cut the input into fixed-size, content-hashed shards.

Streaming: rows are read one at a time and written a shard at a time, so peak memory is
one shard, whatever the corpus size. The same input and shard size give the same shards
with the same hashes, which is what makes a shard's hash a usable checkpoint key.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from blocks.storage import ObjectStorage
from nightshift.canaries import CANARY_PREFIX, load_canaries
from nightshift.inputs import CorpusOptions, InputRow, detect_kind, read_rows
from nightshift.records import Plan, Shard
from nightshift.rundir import RunDir

SHARD_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),  # 0-based position in the input, the output order
        ("line_no", pa.int64()),
        ("custom_id", pa.string()),
        ("request", pa.string()),  # JSON {"url", "body"}, null for a rejected row
        ("error", pa.string()),  # JSON {"code", "message", "line"}, null for a request
    ]
)


def plan(
    input_path: str,
    run_dir: RunDir,
    shard_size: int = 10_000,
    corpus: CorpusOptions | None = None,
    canaries: list[InputRow] | None = None,
    storage_options: dict | None = None,
) -> Plan:
    """Write the shards of `input_path` under the run directory and return their manifest.

    Canary rows ride inside the shards — one at the head of each shard while they last, the
    rest in the last shard — so they run under the real load and batching.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    kind = detect_kind(input_path, corpus)
    waiting_canaries = list(canaries or [])
    shards: list[Shard] = []
    pending: list[InputRow] = []
    total = 0  # rows planned, canaries included: the row_index space
    for row in read_rows(input_path, kind, corpus, storage_options):
        if not pending and waiting_canaries:
            pending.append(waiting_canaries.pop(0))
            total += 1
        pending.append(row)
        total += 1
        if len(pending) - sum(_is_canary(r) for r in pending) == shard_size:
            shards.append(_write_shard(run_dir, len(shards), total - len(pending), pending))
            pending = []
    pending += waiting_canaries
    total += len(waiting_canaries)
    if pending:
        shards.append(_write_shard(run_dir, len(shards), total - len(pending), pending))
    result = Plan(input_path=input_path, input_kind=kind, total_rows=total, shards=shards,
                  canary_rows=len(canaries or []))
    result.save(run_dir.plan_manifest)
    return result


@task(name="plan-shards")
def plan_shards(
    input_path: str,
    run_dir: str,
    shard_size: int = 10_000,
    corpus: CorpusOptions | None = None,
    canary_file: str | None = None,
    storage: str | None = None,
) -> Plan:
    """`storage` names an ObjectStorage block; it is loaded here so that its credentials
    never travel as task parameters."""
    canaries = [row for row, _ in load_canaries(canary_file)] if canary_file else None
    storage_options = ObjectStorage.load(storage).storage_options() if storage else None
    return plan(input_path, RunDir(run_dir), shard_size, corpus, canaries, storage_options)


def _is_canary(row: InputRow) -> bool:
    return bool(row.custom_id) and row.custom_id.startswith(CANARY_PREFIX)


def _write_shard(run_dir: RunDir, index: int, first_row: int, rows: list[InputRow]) -> Shard:
    import json

    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.canonical())
        digest.update(b"\n")
    content_hash = digest.hexdigest()
    path = run_dir.shard_input(index, content_hash)
    if not path.exists():  # same name means same content: a re-plan rewrites nothing
        table = pa.table(
            {
                "row_index": [first_row + i for i in range(len(rows))],
                "line_no": [r.line_no for r in rows],
                "custom_id": [r.custom_id for r in rows],
                "request": [json.dumps(r.request, ensure_ascii=False) if r.request else None for r in rows],
                "error": [json.dumps(r.error, ensure_ascii=False) if r.error else None for r in rows],
            },
            schema=SHARD_SCHEMA,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return Shard(index=index, path=str(path), first_row=first_row, num_rows=len(rows), content_hash=content_hash)
