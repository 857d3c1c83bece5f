"""Plan stage: cut the input into content-hashed shards of at most `shard_size` rows.

Streaming: rows are read once, one at a time, and written a shard at a time, so peak memory is
one shard, whatever the corpus size (rows sharing prompt prefixes scattered over the input are
first spilled to local disk, then regrouped: nightshift/stages/layout.py). The same input and settings
give the same shards with the same hashes, which is what makes a shard's hash a usable
checkpoint key.
"""

from __future__ import annotations

import hashlib
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nightshift.config import DEFAULT_SHARD_SIZE, CorpusOptions
from nightshift.inputs import EMBEDDINGS_URL, InputRow, detect_kind, read_rows
from nightshift.records import Plan, Shard
from nightshift.runtime.rundir import RunDir, written_whole
from nightshift.runtime.storage import sql_path
from nightshift.stages.layout import (
    LINT_SAMPLE_ROWS,
    PREFIX_CUTS,
    ShardCut,
    cut_shards,
    misplaced_shared_text,
    prefix_hashes,
)

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
    group_prefixes: bool = True,
) -> Plan:
    """Write the shards of `input_path` under the run directory and return their manifest.

    Shards are slices of the input, unless `group_prefixes` and rows sharing prompt prefixes lie
    scattered over an input of several shards: then each shard holds whole prefix groups
    (nightshift/stages/layout.py: `cut_shards`), so every group's prefix is computed once, on one engine.
    Canary rows ride inside the shards — one in each shard while they last, the rest in the last
    shard — so they run under the real load and batching.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    kind = detect_kind(input_path, corpus)
    seen = _SeenRows()
    rows = seen.watch(read_rows(input_path, kind, corpus, storage_options))
    with tempfile.TemporaryDirectory(prefix="nightshift-plan-") as scratch:
        if group_prefixes:
            spill = _Spill(Path(scratch), shard_size)
            for row in rows:
                spill.add(row)
            cut = spill.cut()
            if cut.regrouped:
                shards, total = _write_regrouped(run_dir, spill, cut, canaries or [], Path(scratch))
            else:
                shards, total = _write_slices(run_dir, spill.rows(), shard_size, canaries or [])
        else:
            cut = None
            shards, total = _write_slices(run_dir, rows, shard_size, canaries or [])
    result = Plan(
        input_path=input_path,
        input_kind=kind,
        total_rows=total,
        shards=shards,
        canary_rows=len(canaries or []),
        rejected_by_code=seen.rejected,
        misplaced_shared_text=misplaced_shared_text(
            seen.prompts, corpus.template if corpus and kind == "corpus" else None
        ),
        layout="prefix-groups" if cut is not None and cut.regrouped else "input-slices",
        shareable_prompt_share_input_order=cut.shareable_input_order if cut is not None else None,
        shareable_prompt_share_regrouped=cut.shareable_regrouped if cut is not None else None,
    )
    result.save(run_dir.plan_manifest)
    return result


class _SeenRows:
    """What planning tells about the rows it read: rejections by code, and the head of the
    input's prompts for the template lint."""

    def __init__(self) -> None:
        self.rejected: dict[str, int] = {}
        self.prompts: list = []

    def watch(self, rows: Iterator[InputRow]) -> Iterator[InputRow]:
        for row in rows:
            if row.error is not None:
                self.rejected[row.error["code"]] = self.rejected.get(row.error["code"], 0) + 1
            elif len(self.prompts) < LINT_SAMPLE_ROWS:
                self.prompts.append(_prompt(row))
            yield row


def _prompt(row: InputRow):
    if row.request_json is None:
        return None
    request = orjson.loads(row.request_json)
    if request.get("url") == EMBEDDINGS_URL:
        return None  # pooling reuses no KV cache: nothing to group for
    body = request.get("body") or {}
    return body.get("messages", body.get("prompt"))


def _write_slices(
    run_dir: RunDir, rows: Iterable[InputRow], shard_size: int, canaries: list[InputRow]
) -> tuple[list[Shard], int]:
    """Consecutive slices of `shard_size` rows, streamed: memory holds one shard."""
    waiting_canaries = list(canaries)
    shards: list[Shard] = []
    pending: list[InputRow] = []
    pending_canaries = 0  # canaries ride along and do not count towards shard_size
    total = 0  # rows planned, canaries included: the row_index space
    for row in rows:
        if not pending and waiting_canaries:
            pending.append(waiting_canaries.pop(0))
            pending_canaries = 1
        pending.append(row)
        if len(pending) - pending_canaries == shard_size:
            shards.append(_write_shard(run_dir, len(shards), range(total, total + len(pending)), pending))
            total += len(pending)
            pending, pending_canaries = [], 0
    pending += waiting_canaries
    if pending:
        shards.append(_write_shard(run_dir, len(shards), range(total, total + len(pending)), pending))
        total += len(pending)
    return shards, total


def _write_regrouped(
    run_dir: RunDir, spill: _Spill, cut: ShardCut, canaries: list[InputRow], scratch: Path
) -> tuple[list[Shard], int]:
    """The shards of `cut`, each its rows in input order (a row's index is its input position;
    canaries take the indices after the input's). DuckDB sorts the spilled rows by shard, on
    disk past its memory limit, so memory holds one shard whatever the input's size."""
    shard_of = np.empty(spill.count, dtype=np.int32)
    for shard, positions in enumerate(cut.shards):
        shard_of[positions] = shard
    canaries_of = [canaries[i : i + 1] for i in range(len(cut.shards))]
    canaries_of[-1] = canaries_of[-1] + canaries[len(cut.shards) :]
    next_canary = spill.count
    shards: list[Shard] = []
    con = duckdb.connect()
    try:
        con.execute(f"SET temp_directory = '{sql_path(scratch)}'")
        con.execute(f"SET memory_limit = '{REGROUP_MEMORY}'")
        con.execute("SET enable_progress_bar = false")
        con.register("assignment", pa.table({"position": pa.array(np.arange(spill.count)), "shard": shard_of}))
        reader = con.sql(
            f"""SELECT a.shard, s.* FROM read_parquet('{sql_path(spill.path)}') s
                JOIN assignment a USING (position) ORDER BY a.shard, s.position"""
        ).to_arrow_reader(8192)
        pending: list[InputRow] = []
        indices: list[int] = []
        for batch in reader:
            for row in batch.to_pylist():
                if row["shard"] != len(shards) and pending:
                    next_canary = _flush_regrouped(run_dir, shards, pending, indices, canaries_of, next_canary)
                    pending, indices = [], []
                pending.append(_Spill.row_of(row))
                indices.append(row["position"])
        _flush_regrouped(run_dir, shards, pending, indices, canaries_of, next_canary)
    finally:
        con.close()
    return shards, spill.count + len(canaries)


def _flush_regrouped(run_dir: RunDir, shards, rows, indices, canaries_of, next_canary) -> int:
    riding = canaries_of[len(shards)]
    indices = indices + list(range(next_canary, next_canary + len(riding)))
    shards.append(_write_shard(run_dir, len(shards), indices, rows + riding))
    return next_canary + len(riding)


# DuckDB's memory while it sorts a regrouped input by shard; past it, it sorts on local disk.
REGROUP_MEMORY = "256MB"


class _Spill:
    """The input's rows on local disk in input order, and their prompts' prefix hashes in memory
    (96 bytes a row): what cutting shards on prefix groups needs of an input read once. An input
    of one shard stays in memory, unhashed: it has no other cut."""

    SCHEMA = pa.schema(
        [
            ("position", pa.int64()),
            ("line_no", pa.int64()),
            ("custom_id", pa.string()),
            ("request", pa.string()),
            ("error", pa.string()),
        ]
    )
    BATCH_ROWS = 8192

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.path = directory / "input-rows.parquet"
        self.shard_size = shard_size
        self.count = 0
        self._head: list[InputRow] | None = []  # until the input outgrows one shard
        self._batch: list[InputRow] = []
        self._writer: pq.ParquetWriter | None = None
        self._hashes = array("Q")
        self._lengths = array("q")

    def add(self, row: InputRow) -> None:
        self.count += 1
        if self._head is not None:
            self._head.append(row)
            if self.count <= self.shard_size:
                return
            head, self._head = self._head, None
            for earlier in head:
                self._spill(earlier)
        else:
            self._spill(row)

    def _spill(self, row: InputRow) -> None:
        hashes, length = prefix_hashes(_prompt(row))
        self._hashes.extend(hashes)
        self._lengths.append(length)
        self._batch.append(row)
        if len(self._batch) == self.BATCH_ROWS:
            self._write()

    def cut(self) -> ShardCut:
        if self._head is not None:
            return ShardCut([np.arange(self.count)], False, 1.0, 1.0)
        self._write()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        hashes = np.frombuffer(self._hashes, dtype=np.uint64).reshape(self.count, len(PREFIX_CUTS))
        cut = cut_shards(hashes, np.frombuffer(self._lengths, dtype=np.int64), self.shard_size)
        del hashes
        self._hashes, self._lengths = array("Q"), array("q")  # the cut is made: their memory back
        return cut

    def rows(self) -> Iterator[InputRow]:
        if self._head is not None:
            yield from self._head
            return
        for batch in pq.ParquetFile(self.path).iter_batches(self.BATCH_ROWS, columns=self.SCHEMA.names[1:]):
            yield from map(self._row, *(column.to_pylist() for column in batch.columns))

    @staticmethod
    def row_of(row: dict) -> InputRow:
        return _Spill._row(row["line_no"], row["custom_id"], row["request"], row["error"])

    @staticmethod
    def _row(line_no: int, custom_id: str | None, request: str | None, error: str | None) -> InputRow:
        return InputRow(line_no, custom_id, request, orjson.loads(error) if error is not None else None)

    def _write(self) -> None:
        if not self._batch:
            return
        first = len(self._lengths) - len(self._batch)
        table = pa.table(
            {
                "position": pa.array(range(first, first + len(self._batch)), pa.int64()),
                "line_no": [row.line_no for row in self._batch],
                "custom_id": [row.custom_id for row in self._batch],
                "request": [row.request_json for row in self._batch],
                "error": [row.error_json for row in self._batch],
            },
            schema=self.SCHEMA,
        )
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.SCHEMA)
        self._writer.write_table(table)
        self._batch = []


def layout_message(planned: Plan) -> str:
    """How the shards were cut, for the log and `nightshift plan`."""
    if planned.layout == "prefix-groups":
        return (
            f"rows sharing prompt prefixes gathered into the same shards: "
            f"{planned.shareable_prompt_share_regrouped:.0%} of the prompts' text can come from a shard's "
            f"prefix cache, against {planned.shareable_prompt_share_input_order:.0%} with shards as input slices"
        )
    return "shards are consecutive slices of the input"


def _write_shard(run_dir: RunDir, index: int, row_indices: Sequence[int], rows: list[InputRow]) -> Shard:
    errors = [row.error_json for row in rows]
    digest = hashlib.sha256()
    for row_index, row, error in zip(row_indices, rows, errors):
        digest.update(f"{row_index}\x00{row.custom_id}\x00{row.request_json}\x00{error}\n".encode())
    content_hash = digest.hexdigest()
    path = run_dir.shard_input(index, content_hash)
    if not path.exists():  # same name means same content: a re-plan rewrites nothing
        table = pa.table(
            {
                "row_index": pa.array(row_indices, pa.int64()),
                "line_no": [r.line_no for r in rows],
                "custom_id": [r.custom_id for r in rows],
                "request": [r.request_json for r in rows],
                "error": errors,
            },
            schema=SHARD_SCHEMA,
        )
        with written_whole(path) as tmp:
            pq.write_table(table, tmp)
    return Shard(index=index, path=str(path), first_row=row_indices[0], num_rows=len(rows), content_hash=content_hash)
