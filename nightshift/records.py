"""The small typed records that flow one way through the DAG.

    plan  ──Plan[Shard]──▶  generate  ──ShardResult──▶  merge  ──RunReport──▶

Tasks hand each other these records (paths and counts), never the rows themselves. The job's
configuration (EngineConfig, JobSpec, ...) lives in `nightshift.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from nightshift.runtime.rundir import write_json_atomic
from nightshift.runtime.storage import location


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump())

    @classmethod
    def load(cls, path: Path):
        return cls.model_validate_json(location(path).read_text())


class Shard(_Record):
    """A part of the input: rows [first_row, first_row + num_rows) when the plan's layout is
    "input-slices"; whole prefix groups gathered from anywhere in the input ("prefix-groups")."""

    index: int
    path: str = Field(description="Parquet file of the shard's rows, written by the plan stage")
    first_row: int = Field(description="the lowest row index it holds")
    num_rows: int
    content_hash: str = Field(description="sha256 over its rows' indices and raw input, in order")


class MisplacedSharedText(_Record):
    """Rows whose prompts share a long ending but not their beginning: text common to many rows
    placed after each row's own content, which vLLM's prefix cache can never serve
    (nightshift/stages/layout.py: `misplaced_shared_text`)."""

    rows_sampled: int
    rows_affected: int = Field(description="sampled rows sharing more text at their end than at their start")
    shared_end_chars: int = Field(description="median characters those rows share at their end")
    shared_start_chars: int = Field(description="median characters they share at their start")
    where: str = Field(description="where the shared ending begins: a message (its role) or the prompt")
    snippet: str = Field(description="the shared ending's first characters")
    advice: str

    def message(self) -> str:
        share = self.rows_affected / self.rows_sampled
        return (
            f"{share:.0%} of rows (of {self.rows_sampled:,} sampled) end with the same "
            f"~{self.shared_end_chars:,} characters ({self.where}: {self.snippet!r}…) but share only "
            f"~{self.shared_start_chars:,} at their start, and the prefix cache serves only what rows share at "
            f"their start: {self.advice}"
        )


class Plan(_Record):
    """The plan stage's manifest: the shards of one input."""

    input_path: str
    input_kind: str = Field(description='"openai-batch" or "corpus"')
    total_rows: int = Field(description="canary rows included")
    shards: list[Shard]
    canary_rows: int = 0
    rejected_by_code: dict[str, int] = Field(default_factory=dict, description="rows the plan stage rejected")
    misplaced_shared_text: MisplacedSharedText | None = Field(
        None, description="the template lint: shared text after the per-row content, in a sample of the rows"
    )
    layout: Literal["input-slices", "prefix-groups"] = Field(
        "input-slices", description="shards as consecutive input rows, or regrouped by shared prompt prefix"
    )
    shareable_prompt_share_input_order: float | None = Field(
        None, description="share of prompt bytes a shard's prefix cache could serve with shards as input slices"
    )
    shareable_prompt_share_regrouped: float | None = Field(
        None, description="the same with shards cut on prefix groups (what decided the layout)"
    )


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


class ShardMetrics(_Record):
    """`metrics.json` beside a shard's chunks: what its last attempt did, what it cost, and what
    the GPU did meanwhile. The report aggregates these files in DuckDB."""

    shard_index: int
    cache_key: str
    rows: int
    generated_rows: int = Field(description="rows that went through the engine in this attempt")
    prompt_tokens: int
    completion_tokens: int
    wall_seconds: float
    engine_seconds: float
    engine_started: float = Field(description="Unix time")
    engine_finished: float = Field(description="Unix time")
    tokens_generated: int = Field(description="by this attempt: rows resumed from disk were made by an earlier one")
    tokens_per_second: float | None = Field(description="of this attempt; None when it generated nothing")
    finish_reasons: dict[str, int]
    max_model_len: int | None = Field(description="the context the engine ran with")
    errors_by_code: dict[str, int]
    token_timeline: list[tuple[int, int]] = Field(description="(Unix second, tokens finished in it)")
    engine_settings: dict[str, Any] | None = Field(None, description="as vLLM resolved them (vllm_adapter)")
    engine_prompt_tokens: int = Field(0, description="prompt tokens of the rows this attempt ran on the engine")
    cached_prompt_tokens: int = Field(0, description="of those, the ones vLLM's prefix cache served")
    politeness: list[tuple[float, float | None, int]] | None = Field(
        None, description="with an online TTFT objective: (Unix time, online TTFT ms by the probe, rows in flight)"
    )
    host: str
    cuda_visible_devices: str | None = Field(description="which of the host's GPUs the engine had")
    gpu_name: str | None
    gpu_count: int
    gpu_telemetry: str = Field(description='"pynvml", or why there are no samples')
    gpu_samples: list[dict[str, float]] = Field(description="t (Unix time), util (%), mem_mib, power_w")
    gpu_util_mean: float | None
    gpu_util_p50: float | None
    gpu_util_p95: float | None
    gpu_mem_mib_mean: float | None
    gpu_mem_mib_p50: float | None
    gpu_mem_mib_p95: float | None
    gpu_power_w_mean: float | None
    gpu_power_w_p50: float | None
    gpu_power_w_p95: float | None


class RunReport(_Record):
    """The merged run: where the outputs are and whether every row is accounted for."""

    run_dir: str
    total_rows: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="of the prompt tokens, those the engine's prefix cache served")
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


class Straggler(_Record):
    shard: int | None = None
    engine_seconds: float | None = None
    times_median: float | None = None


class NotGenerated(_Record):
    """Deterministic rows answered by an identical row or the result cache: tokens and $ not spent."""

    rows: int = 0
    tokens: int = 0
    cost_saved_on_demand: float = 0.0


class Projection(_Record):
    rows: int
    hours: float | None
    cost_on_demand: float | None
    cost_spot: float | None


class Politeness(_Record):
    """How the batch shared its engine server with online traffic (nightshift/engine/politeness.py)."""

    objective_ms: float = Field(description="the online time to first token the batch kept to")
    looks: int = Field(description="probes of the online TTFT")
    online_ttft_ms_p50: float | None
    online_ttft_ms_p95: float | None
    over_objective: float = Field(description="share of probes over the objective")
    in_flight_min: int
    in_flight_median: float
    in_flight_max: int


class Throughput(_Record):
    """How fast the run's engines went (nightshift/report/price.py)."""

    tokens_per_second: float | None = Field(description="tokens the engines generated per second of the run")
    engine_slots: int = Field(description="engines that ran side by side (GPUs billed)")
    max_model_len: int | None = Field(None, description="the context the engine ran with")
    generate_seconds: float | None = None
    engine_seconds_summed: float | None = None
    output_tokens_per_second: float | None = None
    rows_per_second: float | None = None
    stragglers: list[Straggler] = Field(default_factory=list, description="slowest shards against the median")
    prefix_cache_hit_rate: float | None = Field(
        None, description="prompt tokens vLLM's prefix cache served / prompt tokens of the rows the engine ran"
    )


class Money(_Record):
    """What the run cost on the hardware it used, per token and per row, against the managed APIs,
    and projected to a million rows."""

    accelerator: str
    accelerator_hours: float = 0.0
    cost_on_demand: float | None = 0.0  # None: the accelerator is unpriced (blocks/pricing.py)
    cost_spot: float | None = 0.0
    cost_per_million_tokens: float | None = None
    cost_per_million_tokens_spot: float | None = None
    cost_per_million_output_tokens: float | None = None
    cost_per_million_output_tokens_spot: float | None = None
    cost_per_million_rows: float | None = None
    cost_per_million_rows_spot: float | None = None
    served_without_generating: NotGenerated = Field(default_factory=NotGenerated)
    managed_api_cost: dict[str, float] = Field(default_factory=dict, description="the same tokens at list prices")
    by_model: dict[str, ModelRows] = Field(
        default_factory=dict,
        description="a run with LoRA adapters: rows, tokens and $ of the base model and of each adapter",
    )
    projection: Projection | None = None


class GpuFigures(_Record):
    """The accelerators the run measured (pynvml), or none: a CPU run."""

    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_telemetry: str | None = None
    gpu_utilization_mean: float | None = None
    gpu_memory_mib_mean: float | None = None
    gpu_power_w_mean: float | None = None


class Priced(GpuFigures, Money, Throughput):
    """The measured engine time and rows, priced: what `nightshift.report.priced` returns."""


class EngineFigures(_Record):
    engine_settings: dict[str, Any] | None = Field(None, description="the engine's settings as vLLM resolved them")
    engine_warnings: list[str] = Field(default_factory=list, description="known throughput traps those settings show")


class ValidationFigures(_Record):
    """The canary stage's verdict, once it has written one."""

    validated: bool | None = None
    validation_state: str | None = Field(None, description="validated, not_validated (no check applied) or failed")
    validation_failures: list[str] | None = None
    validation_seconds: float | None = None
    validation_cost_on_demand: float | None = None
    validation_checks: dict[str, dict] | None = None


class CostReport(ValidationFigures, EngineFigures, Priced):
    """`report.json`: a run's rows, throughput and money, measured from its files and priced
    (nightshift/report/), its records flat in one object. `nightshift plan` reads earlier nights'
    reports as its history; the figures it needs are required, the rest may be missing from a
    report of an older version."""

    rows: int
    failed: int
    completion_tokens: int
    run_dir: str = ""
    model: str = ""
    prompt_tokens: int = 0
    image_tokens: int = Field(0, description="of the prompt tokens, those the rows' images became (a vision model)")
    total_tokens: int = 0
    truncation_share: float = 0.0
    errors_by_code: dict[str, int] = Field(default_factory=dict)
    politeness: Politeness | None = Field(None, description="with an online TTFT objective on an engine server")

    # what a run's event and its report asset say of it (nightshift.observe.events, nightshift.observe.assets)
    HEADLINE: ClassVar[tuple[str, ...]] = (
        "rows", "failed", "prompt_tokens", "completion_tokens", "cost_on_demand", "cost_spot",
        "cost_per_million_tokens", "tokens_per_second", "prefix_cache_hit_rate",
    )  # fmt: skip

    def headline_figures(self) -> dict:
        return headline_of(self.model_dump(include=set(self.HEADLINE)))

    def figures(self) -> dict:
        """report.json's content: a run not validated (yet) has no validation figures, rather than nulls."""
        return self.model_dump(exclude=set(ValidationFigures.model_fields) if self.validated is None else set())

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.figures())

    @property
    def tokens_per_second_per_engine(self) -> float | None:
        """What one engine (one GPU slot) generated per second: the throughput a plan scales."""
        return self.tokens_per_second / max(self.engine_slots, 1) if self.tokens_per_second else None

    @property
    def completion_per_row(self) -> float | None:
        finished = self.rows - self.failed
        return self.completion_tokens / finished if finished > 0 else None


def headline_of(report: dict) -> dict:
    """The headline figures (CostReport.HEADLINE) a report.json holds, those not null."""
    return {name: report[name] for name in CostReport.HEADLINE if report.get(name) is not None}


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
    epoch: int | None = Field(
        None,
        description="the lease epoch of the run that wrote it: a snapshot of an epoch older than the "
        "directory's lease is the late write of a run since taken over, and its readers ignore it",
    )


class ModelRows(_Record):
    """One model's share of a run with LoRA adapters: the base model's rows, or one adapter's."""

    rows: int = Field(description="rows answered")
    prompt_tokens: int
    completion_tokens: int
    cost_on_demand: float | None = Field(None, description="the run's cost, shared out by tokens")
    cost_spot: float | None = None


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
    image_tokens: int = Field(0, description="of the prompt tokens, those the rows' images became")
    by_model: dict[str, ModelRows] = Field(
        default_factory=dict, description="with LoRA adapters: the answered rows of the base model and each adapter"
    )


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
    prefix_cache_hit_rate: float | None = Field(None, description="cached prompt tokens / prompt tokens, engine rows")
    engine_settings: dict[str, Any] | None = Field(None, description="as vLLM resolved them, the latest shard's engine")


# ── the canary stage's verdict (validation.json) ──────────────────────────────────────────────


class CanaryOutcome(_Record):
    canary: str = Field(description="the canary's id, without the canary prefix")
    passed: bool
    problems: list[str]
    text: str | None = Field(description="what the run answered (None: the row failed)")


class CanariesCheck(_Record):
    """The canary rows that rode inside the shards against their expectations."""

    pass_rate: float
    min_pass_rate: float
    results: list[CanaryOutcome]


class OracleOutcome(_Record):
    custom_id: str
    agrees: bool = Field(description="every scored token within the reference's top-k and tolerance")
    tokens: int
    worst_rank: int
    worst_gap: float
    scored_as: str = Field(
        "greedy", description="greedy (rank and gap), or sampled (excess surprisal) at its temperature"
    )
    excess_surprisal: float | None = Field(
        None, description="a sampled row: its tokens' mean surprisal less the reference's entropy, nats per token"
    )
    reference_on: str = Field(description="where the reference ran: device and dtype")
    ours: str = Field(description="the run's answer, its first 80 characters")
    adapter: str | None = Field(None, description="the LoRA adapter of the row (the reference: base + it, merged)")


class OracleCheck(_Record):
    """The run's tokens scored teacher-forced by transformers on the reference weights."""

    agreement: float
    min_agreement: float
    reference: str
    adapter_references: dict[str, str] = Field(
        default_factory=dict, description="each LoRA adapter sampled → the adapter merged into the reference"
    )
    tokens: int
    top_k: int
    logprob_tolerance: float
    results: list[OracleOutcome]
    memory: str | None = Field(
        None, description="on a GPU: the reference beside the run's engine, or the engine shut down first"
    )


class EmbeddingOutcome(_Record):
    custom_id: str
    cosine: float
    truncated: bool


class EmbeddingOracleCheck(_Record):
    """The run's vectors against transformers' on the reference weights."""

    min_cosine: float
    required: float
    reference: str
    results: list[EmbeddingOutcome]


class DeterminismOutcome(_Record):
    custom_id: str
    same: bool


class DeterminismCheck(_Record):
    """Sampled rows re-run with the same parameters, seed included."""

    same: int
    of: int
    results: list[DeterminismOutcome]


class SettingsGateOutcome(_Record):
    custom_id: str
    agrees: bool = Field(description="every scored token within the contrast's top-k and tolerance")
    tokens: int
    worst_rank: int
    worst_gap: float


class SettingsGateCheck(_Record):
    """The run's greedy tokens scored teacher-forced by the engine under a contrasting setting:
    the throughput settings did not change the answers beyond the oracle's tolerance."""

    contrast: str = Field(description="the setting the rows were scored under, against the run's")
    agreement: float
    min_agreement: float
    tokens: int
    top_k: int
    logprob_tolerance: float
    seconds: float = Field(description="what the gate cost, engine start included")
    results: list[SettingsGateOutcome]


class SkippedCheck(_Record):
    """A check said and not attempted (no greedy row to sample, a reference too big here)."""

    skipped: str


Check = CanariesCheck | OracleCheck | EmbeddingOracleCheck | DeterminismCheck | SettingsGateCheck | SkippedCheck


class Verdict(_Record):
    """The canary stage's verdict on a merged run: `validation.json`, and the `.verdict` a
    validation run on the pool leaves under its flow run's name."""

    validated: bool = Field(description="at least one check ran and every check that ran passed")
    checks: dict[str, Check] = Field(description="by name: canaries, oracle, embedding_oracle, determinism")
    failures: list[str] = Field(description="one line per gating check that failed")
    state: Literal["validated", "not_validated", "failed"] | None = Field(
        None,
        description="validated; failed (a check failed: the gate fails the run); not_validated — no check applied, "
        "each skipped one says why (not a failure unless --require-validation)",
    )

    @property
    def verdict(self) -> str:
        """The state, for verdicts written before states were (validated or failed)."""
        return self.state or ("validated" if self.validated else "failed")

    @property
    def skipped_reasons(self) -> list[str]:
        return [f"{name}: {check.skipped}" for name, check in self.checks.items() if isinstance(check, SkippedCheck)]

    def said(self) -> str:
        """The verdict in words: "passed", "FAILED", or "not validated (why each check was skipped)"."""
        if self.verdict == "not_validated":
            return f"not validated ({'; '.join(self.skipped_reasons) or 'no check applies to these rows'})"
        return "passed" if self.verdict == "validated" else "FAILED"

    seconds: float | None = Field(None, description="what the checks took (the engine is held meanwhile)")
    where: dict[str, str | int | None] = Field(
        default_factory=dict, description="host, pid, worker_pid, cuda_visible_devices, flow_run_id"
    )

    def summaries(self, leave_out: tuple[str, ...] = ("results",)) -> dict[str, dict]:
        """Each check's figures, its per-row results (and other `leave_out` fields) left out."""
        return {name: check.model_dump(exclude=set(leave_out)) for name, check in self.checks.items()}


# ── fan-out: what a child run on a GPU worker leaves in the run directory ──────────────────────


class Lease(_Record):
    """`lease.json`: the one live run of a run directory (nightshift/runtime/lease.py)."""

    token: str = Field(description="the holder's secret-free claim: a later writer with another token took it over")
    host: str
    pid: int
    pid_started: float = Field(description="the process's start time: a reused pid is not the holder")
    flow_run_id: str | None = None
    since: str = Field(description="when the run took the directory, ISO 8601")
    heartbeat: float = Field(
        description="Unix time the holder took the directory; its later beats are in its LeaseBeat. On its own "
        "host, a last beat older than the TTL is expired; elsewhere only one that stops changing for a TTL of the "
        "observer's own clock is"
    )
    epoch: int = Field(1, description="grows by one with every run that takes the directory: the owner fence")
    released: bool = Field(
        False, description="written by runs before 2026-12-07; a holder now lets go in its LeaseBeat"
    )

    def describe(self) -> str:
        run = f", flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"pid {self.pid} on {self.host}{run}, since {self.since} (epoch {self.epoch})"


class LeaseBeat(_Record):
    """`lease-beats/TOKEN.json`: the lease holder's latest heartbeat (Unix time), and its release."""

    heartbeat: float
    released: bool = Field(False, description="the holder ended and let go: nobody holds the directory")


class WorkerIdentity(_Record):
    """Which machine and which worker slot (GPU) ran a child flow run."""

    host: str
    pid: int
    worker_pid: int = Field(description="the worker that started the flow run's process")
    cuda_visible_devices: str | None


class Heartbeat(WorkerIdentity):
    """`groups/<group>/<flow run id>.alive`, rewritten every few seconds while the run works."""

    heartbeat: float = Field(description="Unix time of the beat (an object store has no mtime to touch)")


class GroupManifest(WorkerIdentity):
    """`groups/<group>/<flow run id>.json`: a child run's group done, its shards' results."""

    flow_run_id: str
    cached: int = Field(description="shards that came back from the task cache")
    results: list[ShardResult]


class UnfitWorker(WorkerIdentity):
    """`groups/unfit-workers/<slot>.unfit`: a worker slot that could not start this run's engine."""

    slot: str = Field(
        description="the machine and the GPUs its worker was given (nightshift.fleet.workers.worker_slot)"
    )
    reason: str


class Refusal(UnfitWorker):
    """`groups/<group>/<flow run id>.refused`: a child run handed its group back to the pool."""

    engine_started: bool = Field(description="it tried the engine (the slot's first refusal), or refused at once")
