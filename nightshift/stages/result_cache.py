"""An opt-in, content-addressed store of deterministic rows' responses, shared across runs.

Tonight's file often shares most rows with last night's. With `--result-cache DIR`, a row whose
output does not depend on chance (greedy, or sampled with a seed: `duplicate_key`) is looked up
by `sha256(output fingerprint of the job, url + body)` before it goes to the engine; a hit is
written under the row's own custom_id and ids, with `source = "cache"`, and costs no generation.
Rows the engine does generate are added for the next run. Never keyed on prompt text alone, never
used for sampled rows without a seed; a changed model, dtype, context, seed or quantization
changes the fingerprint, so nothing from another configuration is served.

Layout: `DIR/<output fingerprint[:16]>/<shard key>-<time>-<random>.parquet`, written whole
(see nightshift.runtime.storage), so a reader sees complete files only; lookups are DuckDB over the
fingerprint's files, filtered to one shard's keys. DIR may be a local directory or an
object-store URL (`s3://bucket/nightshift-cache`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from nightshift.runtime.storage import StorageFull, duckdb_connection, location, size_text, sql_path, written_whole
from nightshift.wire.lines import BatchLine
from nightshift.wire.openai_format import batch_request_id

log = logging.getLogger("nightshift.result_cache")

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),  # "chat" or "completion"
        ("body", pa.string()),  # the response body, JSON
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)


class ResultCache:
    def __init__(self, root: str, output_fingerprint: str) -> None:
        self.directory = location(root) / output_fingerprint[:16]
        self.fingerprint = output_fingerprint
        self.added: list[dict] = []

    def key(self, duplicate_key: str) -> str:
        return f"{self.fingerprint}:{duplicate_key}"

    def lookup(self, keys: list[str]) -> dict[str, dict]:
        """The stored responses of those `keys` that have one."""
        files = sorted(self.directory.glob("*.parquet"), key=str)
        if not keys or not files:
            return {}
        wanted = pa.table({"key": keys})
        paths = "[" + ", ".join(f"'{sql_path(f)}'" for f in files) + "]"
        with duckdb_connection() as con:
            con.register("wanted", wanted)
            found = con.sql(
                f"SELECT c.* FROM read_parquet({paths}) c SEMI JOIN wanted USING (key) "
                "QUALIFY row_number() OVER (PARTITION BY c.key) = 1"
            ).to_arrow_table()
        return {row["key"]: row for row in found.to_pylist()}

    def add(self, key: str, kind: str, record: dict) -> None:
        """Keep a generated row's response (`record`: its chunk record) for later runs."""
        self.added.append(
            {
                "key": key,
                "kind": kind,
                "body": json.dumps(json.loads(record["line"])["response"]["body"]),
                "text": record["text"],
                "finish_reason": record["finish_reason"],
                "prompt_tokens": record["prompt_tokens"],
                "completion_tokens": record["completion_tokens"],
            }
        )

    def flush(self, shard_key: str) -> None:
        """Store the rows added, in one file written whole. A cache whose disk is full is said
        once and skipped: it saves later runs work, and tonight's outputs do not wait on it
        (nothing half-written is left: the file appears whole or not at all)."""
        if not self.added:
            return
        path = self.directory / f"{shard_key}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        rows, self.added = self.added, []
        try:
            with written_whole(path) as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        except StorageFull as full:
            log.warning(
                "result cache full: no space left on the device of %s (%s free): %s rows not stored for later "
                "runs; this run's outputs do not depend on it",
                full.target,
                size_text(full.free),
                f"{len(rows):,}",
            )


def cached_output_line(custom_id: str, cache_key: str, stored: dict) -> BatchLine:
    """An output line for `custom_id` carrying a stored response, under this row's own ids."""
    rid = batch_request_id(custom_id, cache_key)
    body = json.loads(stored["body"])
    body["id"] = ("chatcmpl-" if stored["kind"] == "chat" else "cmpl-") + rid
    body["created"] = int(time.time())
    return BatchLine.answered(custom_id, rid, body)
