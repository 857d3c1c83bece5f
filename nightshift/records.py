"""The small typed records that flow one way through the DAG.

    plan  ──Plan[Shard]──▶  generate  ──ShardResult──▶  merge  ──RunReport──▶

Tasks hand each other these records (paths and counts), never the rows themselves. The job's
configuration (EngineConfig, JobSpec, ...) lives in `nightshift.config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from nightshift.rundir import write_json_atomic
from nightshift.storage import location


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump())

    @classmethod
    def load(cls, path: Path):
        return cls.model_validate_json(location(path).read_text())


class Shard(_Record):
    """A fixed slice of the input, rows [first_row, first_row + num_rows)."""

    index: int
    path: str = Field(description="Parquet file of the shard's rows, written by the plan stage")
    first_row: int
    num_rows: int
    content_hash: str = Field(description="sha256 over the raw input of its rows, in order")


class Plan(_Record):
    """The plan stage's manifest: the shards of one input, in input order."""

    input_path: str
    input_kind: str = Field(description='"openai-batch" or "corpus"')
    total_rows: int = Field(description="canary rows included")
    shards: list[Shard]
    canary_rows: int = 0
    rejected_by_code: dict[str, int] = Field(default_factory=dict, description="rows the plan stage rejected")


class ShardResult(_Record):
    """What one shard's generation left on disk, and what it cost."""

    shard_index: int
    cache_key: str
    output_dir: str
    chunk_files: list[str]
    chunk_sha256: list[str]
    rows: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    regenerated_rows: int = Field(description="rows that went through the engine in this attempt")
    wall_seconds: float


class RunReport(_Record):
    """The merged run: where the outputs are and whether every row is accounted for."""

    run_dir: str
    total_rows: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    output_path: str
    errors_path: str
    results_path: str
    embeddings_path: str | None = Field(None, description="a corpus embedded: id, vector, tokens in input order")
    errors_by_code: dict[str, int] = Field(default_factory=dict)
    shards: int = 0
    shards_cached: int = Field(0, description="came back from the task cache: nothing regenerated")
    expired: bool = Field(False, description="stopped at its deadline: its unfinished rows are batch_expired errors")

    @property
    def complete(self) -> bool:
        return self.succeeded + self.failed == self.total_rows


class ProgressSnapshot(_Record):
    """progress.json (`RunDir.progress`): a live run's rows finished so far, its speed and ETA,
    rewritten as chunks land; `nightshift status`, the Batch API and the console read it."""

    completed: int = Field(description="rows with an outcome, checkpointed or about to be")
    total: int
    elapsed_seconds: float
    eta_seconds: float | None = None
    tokens: int = 0
    rolling_tokens_per_second: float | None = Field(None, description="over the last minute")
    updated: float = Field(description="Unix time of this snapshot: a stale one is a run no longer writing")


class RowTotals(_Record):
    """What a run's rows add up to (its results, or the chunks so far): the report's measure of
    the work, before pricing."""

    rows: int
    succeeded: int
    prompt_tokens: int
    completion_tokens: int
    truncation_share: float = Field(description="of the rows that succeeded, the share cut at max_tokens")
    rows_not_generated: int = Field(description="answered by an identical row or the result cache")
    tokens_not_generated: int


class EngineTime(_Record):
    """When a run's engines ran and what their GPUs did, from the shards' metrics.json: the
    report's measure of the time it is billed for, before pricing."""

    span_seconds: float | None = Field(None, description="first engine start to last finish")
    slot_seconds: float | None = Field(None, description="each engine slot's own span, summed: what is billed")
    slots: int = 0
    engine_seconds: float | None = None
    max_model_len: int | None = None
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_utilization_mean: float | None = None
    gpu_memory_mib_mean: float | None = None
    gpu_power_w_mean: float | None = None
    gpu_telemetry: str | None = "no shard metrics"
    stragglers: list[tuple[int, float | None, float | None]] = Field(
        default_factory=list, description="(shard, engine seconds, × the median), slowest first"
    )
