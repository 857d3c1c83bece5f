"""Plan stage: cut the input into fixed-size, content-hashed shards.

Streaming: rows are read one at a time and written a shard at a time, so peak memory is
one shard, whatever the corpus size. The same input and shard size give the same shards
with the same hashes, which is what makes a shard's hash a usable checkpoint key.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from nightshift.canaries import load_canaries
from nightshift.config import DEFAULT_SHARD_SIZE, CorpusOptions
from nightshift.inputs import InputRow, detect_kind, read_rows
from nightshift.layout import LINT_SAMPLE_ROWS, misplaced_shared_text
from nightshift.records import Plan, Shard
from nightshift.rundir import RunDir, written_whole

SHARD_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),  # 0-based position in the input, the output order
        ("line_no", pa.int64()),
        ("custom_id", pa.string()),
        ("request", pa.string()),  # JSON with "url" and "body" (a batch line as read), null for a rejected row
        ("error", pa.string()),  # JSON {"code", "message", "line"}, null for a request
    ]
)


def plan(
    input_path: str,
    run_dir: RunDir,
    shard_size: int = DEFAULT_SHARD_SIZE,
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
    rejected: dict[str, int] = {}
    pending: list[InputRow] = []
    pending_canaries = 0  # canaries ride along and do not count towards shard_size
    total = 0  # rows planned, canaries included: the row_index space
    prompts: list = []  # the head of the input's prompts, for the template lint
    for row in read_rows(input_path, kind, corpus, storage_options):
        if row.error is not None:
            rejected[row.error["code"]] = rejected.get(row.error["code"], 0) + 1
        elif len(prompts) < LINT_SAMPLE_ROWS:
            body = row.request.get("body") or {}
            prompts.append(body.get("messages", body.get("prompt")))
        if not pending and waiting_canaries:
            pending.append(waiting_canaries.pop(0))
            pending_canaries = 1
        pending.append(row)
        if len(pending) - pending_canaries == shard_size:
            shards.append(_write_shard(run_dir, len(shards), total, pending))
            total += len(pending)
            pending, pending_canaries = [], 0
    pending += waiting_canaries
    if pending:
        shards.append(_write_shard(run_dir, len(shards), total, pending))
        total += len(pending)
    result = Plan(
        input_path=input_path,
        input_kind=kind,
        total_rows=total,
        shards=shards,
        canary_rows=len(canaries or []),
        rejected_by_code=rejected,
        misplaced_shared_text=misplaced_shared_text(prompts, corpus.template if corpus and kind == "corpus" else None),
    )
    result.save(run_dir.plan_manifest)
    return result


@task(name="plan-shards")
def plan_shards(
    input_path: str,
    run_dir: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    corpus: CorpusOptions | None = None,
    canary_file: str | None = None,
) -> Plan:
    """An `s3://` input is read with this process's credentials (nightshift.storage): the
    environment's, or the ObjectStorage block the flow loaded. None travels as a parameter."""
    canaries = [row for row, _ in load_canaries(canary_file)] if canary_file else None
    planned = plan(input_path, RunDir(run_dir), shard_size, corpus, canaries)
    rejected = ", ".join(f"{code}={n}" for code, n in planned.rejected_by_code.items()) or "none"
    get_run_logger().info(
        "planned %d shards of %d rows (%d canaries; rejected at planning: %s)",
        len(planned.shards),
        planned.total_rows - planned.canary_rows,
        planned.canary_rows,
        rejected,
    )
    if planned.misplaced_shared_text is not None:
        get_run_logger().warning("prompt layout: %s", planned.misplaced_shared_text.message())
    return planned


def _write_shard(run_dir: RunDir, index: int, first_row: int, rows: list[InputRow]) -> Shard:
    errors = [row.error_json for row in rows]
    digest = hashlib.sha256()
    for row, error in zip(rows, errors):
        digest.update(f"{row.custom_id}\x00{row.request_json}\x00{error}\n".encode())
    content_hash = digest.hexdigest()
    path = run_dir.shard_input(index, content_hash)
    if not path.exists():  # same name means same content: a re-plan rewrites nothing
        table = pa.table(
            {
                "row_index": pa.array(range(first_row, first_row + len(rows)), pa.int64()),
                "line_no": [r.line_no for r in rows],
                "custom_id": [r.custom_id for r in rows],
                "request": [r.request_json for r in rows],
                "error": errors,
            },
            schema=SHARD_SCHEMA,
        )
        with written_whole(path) as tmp:
            pq.write_table(table, tmp)
    return Shard(index=index, path=str(path), first_row=first_row, num_rows=len(rows), content_hash=content_hash)
