"""The layout of a run directory, in one place.

RUN_DIR/
  job.json                            the JobSpec of the latest run (for `nightshift retry`)
  lease.json                          the live run holding the directory (nightshift/runtime/lease.py)
  lease-beats/TOKEN.json              each holder's heartbeat (written under the owner fence)
  progress.json                       live progress: rows done, rate, ETA
  plan/manifest.json                  the Plan: shards in input order
  plan/shard-00000-<hash12>.parquet   a shard's input rows
  shards/<cache_key>/chunk-00000.parquet   generated rows, one file per chunk
  shards/<cache_key>/suspects.json    rows in flight when the engine died under the shard
  shards/<cache_key>/metrics.json     the shard's tokens, seconds and GPU samples
  shards/<cache_key>/result.json      the ShardResult once the shard is complete
  checkpoints/                        Prefect result storage (the task cache)
  groups/<group>/<flow_run_id>.json   a shard group's child flow run on a work pool: what it made
  groups/<group>/<flow_run_id>.alive  its heartbeat, touched while it runs
  groups/<group>/<flow_run_id>.refused  it could not start the engine on its worker: handed back
  groups/validation/<flow_run_id>.verdict  the canary checks' verdict, left by their run on the pool
  groups/unfit-workers/<slot>.unfit   a worker slot that could not start this run's engine
  output.jsonl  errors.jsonl  results.parquet  run.json   merged outputs
  embeddings.parquet                  a corpus embedded: id, vector (fixed-size float32), tokens
  canary_results.parquet  validation.json               the canary stage's evidence and verdict
  report.json  report.md  report.png  the cost and throughput report

RUN_DIR is a local directory or an object-store prefix (`s3://bucket/runs/tonight`): the same
layout either way, reached through `nightshift.runtime.storage`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nightshift.runtime.storage import is_url, location, written_whole

VALIDATION_GROUP = "validation"  # the canary checks' child run on the pool heartbeats as this group


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root) -> None:
        """`root`: a path or URL as an entry point receives it (a flow's parameter, a CLI argument)."""
        root = root.root if isinstance(root, RunDir) else location(root)
        object.__setattr__(self, "root", root if is_url(root) else root.resolve())

    def __str__(self) -> str:
        """The directory as a flow run's parameter names it (a local path or an `s3://` URL)."""
        return str(self.root)

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def lease(self) -> Path:
        return self.root / "lease.json"

    def lease_beat(self, token: str) -> Path:
        """The heartbeat of the lease holder with `token`: a file of its own, so that a beat
        frozen between reading the lease and writing can never write the lease back."""
        return self.root / "lease-beats" / f"{token}.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def plan_manifest(self) -> Path:
        return self.root / "plan" / "manifest.json"

    def shard_input(self, index: int, content_hash: str) -> Path:
        return self.root / "plan" / f"shard-{index:05d}-{content_hash[:12]}.parquet"

    def shard_output(self, cache_key: str) -> Path:
        return self.root / "shards" / cache_key

    @staticmethod
    def chunks(shard_output: Path) -> list[Path]:
        """A shard's chunk files, oldest first (their names are time-ordered)."""
        return sorted(location(shard_output).glob("chunk-*.parquet"), key=str)

    @staticmethod
    def new_chunk(shard_output: Path) -> Path:
        """A unique, time-ordered name: a chunk never overwrites another, whoever else writes here."""
        return location(shard_output) / f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"

    def every_chunk(self) -> list[Path]:
        return list(self.root.glob("shards/*/chunk-*.parquet"))

    # The SQL (DuckDB) of a chunk's landing second, from the `filename` column of a
    # read_parquet(..., filename = true) over chunks: the time_ns its name begins with.
    CHUNK_SECOND_SQL = "(regexp_extract(filename, 'chunk-(\\d+)-', 1)::HUGEINT // 1000000000)::BIGINT"

    def every_shard_metrics(self) -> list[Path]:
        return list(self.root.glob("shards/*/metrics.json"))

    @staticmethod
    def shard_result(shard_output: Path) -> Path:
        return shard_output / "result.json"

    @staticmethod
    def shard_metrics(shard_output: Path) -> Path:
        return shard_output / "metrics.json"

    @staticmethod
    def shard_suspects(shard_output: Path) -> Path:
        return shard_output / "suspects.json"

    def group(self, group_key: str) -> Path:
        return self.root / "groups" / group_key

    def group_manifest(self, group_key: str, flow_run_id: str) -> Path:
        return self.group(group_key) / f"{flow_run_id}.json"

    def group_heartbeat(self, group_key: str, flow_run_id: str) -> Path:
        return self.group(group_key) / f"{flow_run_id}.alive"

    def group_refusal(self, group_key: str, flow_run_id: str) -> Path:
        return self.group(group_key) / f"{flow_run_id}.refused"

    def validation_verdict(self, flow_run_id: str) -> Path:
        """Where the validation run `flow_run_id` on the pool leaves its verdict, under its own name."""
        return self.group(VALIDATION_GROUP) / f"{flow_run_id}.verdict"

    @property
    def unfit_workers(self) -> Path:
        return self.root / "groups" / "unfit-workers"

    def unfit_worker(self, slot: str) -> Path:
        return self.unfit_workers / f"{slot.replace('/', '_')}.unfit"

    def every_unfit_worker(self) -> list[Path]:
        return list(self.unfit_workers.glob("*.unfit"))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output.jsonl"

    @property
    def errors(self) -> Path:
        return self.root / "errors.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.parquet"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.parquet"

    @property
    def canary_results(self) -> Path:
        return self.root / "canary_results.parquet"

    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    @property
    def summary(self) -> Path:
        return self.root / "run.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def report_chart(self) -> Path:
        return self.root / "report.png"

    @staticmethod
    def reports_under(root) -> list[Path]:
        """The report.json of every run directory directly under `root` (a night's history)."""
        return list(location(root).glob("*/report.json"))


def write_json_atomic(path: Path, data) -> None:
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


__all__ = ["RunDir", "write_json_atomic", "written_whole"]
