"""The layout of a run directory, in one place.

RUN_DIR/
  job.json                            the JobSpec of the latest run (for `nightshift retry`)
  plan/manifest.json                  the Plan: shards in input order
  plan/shard-00000-<hash12>.parquet   a shard's input rows
  shards/<cache_key>/chunk-00000.parquet   generated rows, one file per chunk
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

RUN_DIR is a local directory or an object-store prefix (`s3://bucket/runs/tonight`): the same
layout either way, reached through `nightshift.storage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nightshift.storage import is_url, location, written_whole


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root) -> None:
        root = location(root)
        object.__setattr__(self, "root", root if is_url(root) else root.resolve())

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def plan_manifest(self) -> Path:
        return self.root / "plan" / "manifest.json"

    def shard_input(self, index: int, content_hash: str) -> Path:
        return self.root / "plan" / f"shard-{index:05d}-{content_hash[:12]}.parquet"

    def shard_output(self, cache_key: str) -> Path:
        return self.root / "shards" / cache_key

    def group(self, group_key: str) -> Path:
        return self.root / "groups" / group_key

    @property
    def unfit_workers(self) -> Path:
        return self.root / "groups" / "unfit-workers"

    def unfit_worker(self, slot: str) -> Path:
        return self.unfit_workers / f"{slot.replace('/', '_')}.unfit"

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


def write_json_atomic(path: Path, data) -> None:
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


__all__ = ["RunDir", "write_json_atomic", "written_whole"]
