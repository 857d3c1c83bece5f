"""The small typed records that flow one way through the DAG.

    plan  ──Plan[Shard]──▶  generate  ──ShardResult──▶  merge  ──RunReport──▶

Tasks hand each other these records (paths and counts), never the rows themselves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump when the bytes a shard's generation writes change shape: old checkpoints
# then stop matching instead of being read with the wrong layout.
OUTPUT_FORMAT_VERSION = 2


class ConfigurationError(ValueError):
    """The job cannot run as configured (a context longer than the model's, an unknown dtype,
    a missing model, an engine that cannot start here). Said once, exit status 2, never retried."""


@dataclass(frozen=True)
class EngineConfig:
    """How the vLLM engine is built. Fields mirror vLLM's `LLM(...)` arguments; None leaves
    the choice to vLLM (its offline defaults for the hardware) or to Nightshift's sizing:

    * `max_model_len`: the model's own context, lowered only if memory cannot hold one sequence
      that long (vLLM's auto-fit); the shards' metrics.json and the report say which it used.
    * `max_num_seqs` / `max_num_batched_tokens`: vLLM's defaults for the hardware — 256 / 4,096
      on CPU, 256 / 8,192 on most GPUs, 1,024 / 16,384 on H100/H200-class GPUs.
    * `enforce_eager`: decided from the job's size (`nightshift.engine.choose_enforce_eager`).
    * `kv_cache_memory_bytes`: on GPUs vLLM's `gpu_memory_utilization`; on CPU sized from the
      model and the memory free when the engine starts (`nightshift.engine.cpu_kv_cache_bytes`).
    """

    model: str
    dtype: str = "float32"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.2
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides what a shard's outputs are, besides the shard's rows.

    `served_model_name` is the name written into responses and matched against a
    request body's `model` field.
    """

    engine: EngineConfig
    served_model_name: str
    model_identity: str  # weights checksum, or path + size + mtime of the weight files
    chunk_size: int = 512
    model_mismatch: str = "error"  # or "ignore": see docs/inputs.md
    # Opt-in content-addressed store of deterministic rows' outputs across runs (a directory);
    # whether it is used changes no output, so it is not part of the fingerprint.
    result_cache: str | None = None

    def save(self, path: Path) -> None:
        _write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> JobSpec:
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "engine": EngineConfig(**data["engine"])})

    def output_fingerprint(self) -> str:
        """A hash of every setting that changes what one request's response is."""
        return _digest(
            {
                "model_identity": self.model_identity,
                "served_model_name": self.served_model_name,
                "dtype": self.engine.dtype,
                "max_model_len": self.engine.max_model_len,
                "quantization": self.engine.quantization,
                "kv_cache_dtype": self.engine.kv_cache_dtype,
                "seed": self.engine.seed,
                "format": OUTPUT_FORMAT_VERSION,
            }
        )

    def fingerprint(self) -> str:
        """A hash of every setting that changes a shard's generated files (not of engine sizing)."""
        return _digest(
            {"output": self.output_fingerprint(), "chunk_size": self.chunk_size, "model_mismatch": self.model_mismatch}
        )


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the input, rows [first_row, first_row + num_rows)."""

    index: int
    path: str  # Parquet file of the shard's rows, written by the plan stage
    first_row: int
    num_rows: int
    content_hash: str  # sha256 over the raw input of its rows, in order


@dataclass(frozen=True)
class Plan:
    """The plan stage's manifest: the shards of one input, in input order."""

    input_path: str
    input_kind: str  # "openai-batch" or "corpus"
    total_rows: int  # canary rows included
    shards: list[Shard]
    canary_rows: int = 0

    def save(self, path: Path) -> None:
        _write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(Path(path).read_text())
        data["shards"] = [Shard(**s) for s in data["shards"]]
        return cls(**data)


@dataclass(frozen=True)
class ShardResult:
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
    regenerated_rows: int  # rows that went through the engine in this attempt
    wall_seconds: float


@dataclass(frozen=True)
class RunReport:
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
    errors_by_code: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_cached: int = 0  # came back from the task cache: nothing regenerated

    @property
    def complete(self) -> bool:
        return self.succeeded + self.failed == self.total_rows


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
