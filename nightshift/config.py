"""Nightshift's configuration, declared once: typed, with its defaults, descriptions and
validation. The CLI builds its options from these fields (`nightshift.cli`), the Model block
embeds them (`blocks/model.py`), and flows take them as parameters; nothing else writes a default.

    EngineSettings ─┬─ EngineConfig (+ the model's path)  ─┐
    JobOptions     ─┴──────────────────────────────────────┴─ JobSpec: what decides a shard's outputs
    CorpusOptions   how corpus records become requests
    CanaryConfig    what the canary stage checks
    FanOut          where shard groups go on a work pool
    BatchApiConfig  `nightshift serve`: the self-hosted OpenAI Batch API
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nightshift.errors import ConfigurationError
from nightshift.runtime.deadline import parse_duration
from nightshift.runtime.rundir import write_json_atomic

# Bump when the bytes a shard's generation writes change shape: old checkpoints
# then stop matching instead of being read with the wrong layout.
OUTPUT_FORMAT_VERSION = 5  # 5: each row's cached prompt tokens

DEFAULT_SHARD_SIZE = 10_000  # rows per shard: the unit of checkpoints, retries and fan-out


def engine_urls_checked(value: str | None) -> str | None:
    """One or more engine server URLs, comma-separated: each http(s), none with a credential."""
    if value is None:
        return None
    urls = [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
    bad = [url for url in urls if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname]
    if not urls or bad:
        raise ValueError(f"not an http(s) URL: {', '.join(bad) or repr(value)}")
    if any(urlsplit(url).query or urlsplit(url).fragment for url in urls):
        # a ?token= would be saved in job.json, the flow's parameters and every log line naming the server
        raise ValueError(
            "a URL with a query or fragment: give the server's key in $NIGHTSHIFT_ENGINE_API_KEY or a Prefect Secret "
            "block (engine_api_key_secret), never in the URL"
        )
    if any(urlsplit(url).password is not None or "@" in urlsplit(url).netloc for url in urls):
        # a parameter is seen in the dashboard, the run's files and every child run
        raise ValueError(
            "a URL with a user or password in it: give the server's key in $NIGHTSHIFT_ENGINE_API_KEY or a "
            "Prefect Secret block (engine_api_key_secret)"
        )
    return ",".join(urls)


def key_value_pairs(value) -> dict[str, object]:
    """A mapping, or KEY=VALUE strings whose VALUE is JSON where it parses (8, true,
    {"method": "ngram"}) and a string where not."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        return dict(value)
    pairs = {}
    for item in value:
        key, equals, raw = str(item).partition("=")
        if not equals or not key.strip():
            raise ValueError(f"an engine argument is KEY=VALUE, not {item!r}")
        try:
            pairs[key.strip()] = json.loads(raw)
        except ValueError:
            pairs[key.strip()] = raw
    return pairs


def engine_arg_pairs(value) -> dict[str, object]:
    """Engine arguments as given (`key_value_pairs`); a key that is one of EngineSettings' own
    fields is refused (it has a typed option of its own)."""
    value = key_value_pairs(value)
    own = sorted(set(value) & (set(EngineSettings.model_fields) | {"model"}))
    if own:
        raise ValueError(f"{', '.join(own)}: a setting of its own (--{own[0].replace('_', '-')}), not an engine_arg")
    return dict(value)


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraAdapter(_Config):
    """A LoRA adapter served beside the base model: rows whose body's `model` is `name` use it."""

    name: str = Field(min_length=1, description="the model name rows ask for (their body's `model`)")
    path: str = Field(min_length=1, description="a PEFT adapter directory, local or s3://")
    identity: str | None = Field(
        None, description="a hash of the adapter's files, taken when the job is made (nightshift.engine.lora)"
    )

    @classmethod
    def parse(cls, value) -> LoraAdapter:
        """NAME=PATH (the CLI's), a {name:, path:} mapping, or an adapter."""
        if isinstance(value, str):
            name, equals, path = value.partition("=")
            if not equals or not name.strip() or not path.strip():
                raise ValueError(f"a LoRA adapter is NAME=PATH, not {value!r}")
            return cls(name=name.strip(), path=path.strip())
        return cls.model_validate(value)


def lora_adapters(value) -> tuple[LoraAdapter, ...]:
    """Adapters as given: NAME=PATH strings, {name: path}, mappings or adapters; names unique."""
    if value is None:
        return ()
    if isinstance(value, (str, LoraAdapter)):
        value = [value]
    elif isinstance(value, dict):  # {name: path}
        value = [{"name": name, "path": path} for name, path in value.items()]
    adapters = tuple(LoraAdapter.parse(item) for item in value)
    names = [adapter.name for adapter in adapters]
    if len(set(names)) < len(names):
        raise ValueError(f"two LoRA adapters named alike: {', '.join(sorted(names))}")
    return adapters


# A run's class on a shared server: (the vLLM priority of its rows, its weight in a fleet budget).
# Online traffic's default priority, 0, runs before every class.
PRIORITY_CLASSES: dict[str, tuple[int, int]] = {"urgent": (1, 4), "nightly": (5, 2), "backfill": (10, 1)}
PriorityClass = Literal["urgent", "nightly", "backfill"]
BATCH_CLASS_KEY = "nightshift_priority_class"  # a Batch API batch's metadata key: its own class


def batch_class(server_class: str | None, asked: str | None) -> str | None:
    """A Batch API batch's class: the one its metadata asks (BATCH_CLASS_KEY) where the server's
    allows it — a tenant may go below the server's class, never above it — else the server's."""
    if asked is None:
        return server_class
    if asked not in PRIORITY_CLASSES:
        raise ValueError(f"{BATCH_CLASS_KEY} {asked!r} is not one of {', '.join(PRIORITY_CLASSES)}")
    ceiling = server_class or "nightly"
    if PRIORITY_CLASSES[asked][0] < PRIORITY_CLASSES[ceiling][0]:
        raise ValueError(
            f"{BATCH_CLASS_KEY} {asked!r} is above this server's {ceiling!r}: a batch may only go below it"
        )
    return asked


class EngineSettings(_Config):
    """How the vLLM engine is built, the model aside. Fields mirror vLLM's `LLM(...)` arguments;
    None leaves the choice to vLLM (its offline defaults for the hardware) or to Nightshift's sizing."""

    dtype: Literal["auto", "float32", "float", "bfloat16", "float16", "half"] | None = Field(
        None,
        description="weights and activations (default: the platform's — float32 on CPU, where bf16 is emulated; "
        "the model's own on GPUs, bf16 for a bf16 checkpoint)",
    )
    max_model_len: int | None = Field(
        None,
        gt=0,
        description="context: prompt + completion tokens (default: the model's own, lowered only to fit memory)",
    )
    max_num_seqs: int | None = Field(
        None,
        gt=0,
        description="rows decoded together (default: on GPUs vLLM's for the card, up to 1,024; on CPU as many as "
        "the KV cache holds at 512 tokens a row, 256 to 1,024)",
    )
    max_num_batched_tokens: int | None = Field(
        None, gt=0, description="tokens per engine step (default: vLLM's for the hardware)"
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of accelerator memory vLLM may take (default: 0.9 on a GPU, a card of its own; on CPU "
        "the KV cache takes at most 0.2 of the memory free)",
    )
    enforce_eager: bool | None = Field(
        None,
        description="no compilation / CUDA graphs: fastest start, slower decode (default: decided from the job's size)",
    )
    enable_prefix_caching: bool | None = Field(
        None,
        description="reuse KV cache across rows sharing a prompt prefix (default: vLLM's: on for generative models)",
    )
    tensor_parallel_size: int = Field(1, gt=0, description="accelerators one engine spans")
    quantization: str | None = Field(None, description="vLLM quantization method (awq, gptq, fp8, ...)")
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype (auto, fp8, ...)")
    kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache in bytes (default: gpu_memory_utilization on GPUs; sized from the model on CPU)",
    )
    seed: int = Field(0, description="engine seed: sampled rows are reproducible across runs")
    engine_args: tuple[str, ...] = Field(
        (),
        description="any other vLLM engine argument, KEY=VALUE (repeatable; VALUE as JSON where it parses: "
        'e.g. speculative_config={"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":4}, '
        "kv_offloading_size=64 (GiB of host memory for the KV cache), cpu_offload_gb=16): checked against vLLM's "
        "EngineArgs before the engine starts, recorded in the report (docs/gpus.md)",
    )

    @field_validator("engine_args", mode="before")
    @classmethod
    def _key_values(cls, value) -> tuple[str, ...]:
        """Kept as sorted KEY=JSON strings: the config stays hashable (the engine cache's key)."""
        pairs = engine_arg_pairs(value)
        return tuple(f"{key}={json.dumps(pairs[key], sort_keys=True)}" for key in sorted(pairs))

    def with_engine_args(self, values: dict[str, object]) -> Self:
        """This config with `values` as its whole engine_args (checked and kept as KEY=JSON)."""
        return self.model_validate({**self.model_dump(), "engine_args": values})

    def contrasting(self, setting: dict[str, object]) -> Self:
        """This config with `setting` changed: EngineSettings' own fields (max_num_seqs) and vLLM
        engine arguments (kv_cache_dtype) alike."""
        own = {key: value for key, value in setting.items() if key in type(self).model_fields}
        rest = {key: value for key, value in setting.items() if key not in own}
        changed = {**self.model_dump(), **own}
        return self.model_validate({**changed, "engine_args": {**engine_arg_pairs(changed["engine_args"]), **rest}})

    @property
    def engine_arg_values(self) -> dict[str, object]:
        """engine_args as vLLM takes them: KEY → value."""
        return engine_arg_pairs(self.engine_args)

    lora: tuple[LoraAdapter, ...] = Field(
        (),
        description="a LoRA adapter, NAME=PATH (repeatable; PATH local or s3://): rows whose body's model is NAME "
        "are generated with it, beside the base model's rows, on one engine",
    )
    # Nightshift's own, not vLLM's (engine_arguments leaves them out: NIGHTSHIFT_ENGINE_FIELDS).
    engine_start_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="an engine not ready after this many seconds fails the run, retryably, with its threads' "
        "stacks in the log, instead of hanging (a normal start: 10 s to a few minutes)",
    )
    engine_url: str | None = Field(
        None,
        description="an OpenAI-compatible server (http://host:8000/v1, e.g. `vllm serve` of the same model) that "
        "answers the rows instead of an engine in this process; several, comma-separated, for a fleet: shard "
        "groups are spread over them and a server that does not answer is passed over; its key from "
        "$NIGHTSHIFT_ENGINE_API_KEY or engine_api_key_secret, never here",
    )
    engine_api_key_secret: str | None = Field(
        None,
        description="with engine_url: a Prefect Secret block holding the server's key (default: "
        "$NIGHTSHIFT_ENGINE_API_KEY)",
    )
    engine_max_concurrency: int = Field(
        64, gt=0, description="with engine_url: requests in flight to the server at once"
    )
    engine_priority: int | None = Field(
        None,
        description="with engine_url: vLLM's per-request priority for every row (its --scheduling-policy priority "
        "runs lower values first: give batch rows a higher one than online traffic)",
    )
    row_priority_floor: int | None = Field(
        None,
        description="with engine_url: a row's own body `priority` is honoured, raised to at least this value and "
        "engine_priority (lower runs first: no row jumps ahead of online traffic); default: a row's own is ignored",
    )
    online_ttft_slo_ms: float | None = Field(
        None,
        gt=0,
        description="with engine_url: keep the server's online traffic's time to first token within this many ms — "
        "the rows in flight adapt (additive increase, multiplicative decrease, at most engine_max_concurrency) "
        "to a probe at online priority; default: flat out at engine_max_concurrency",
    )
    priority_class: PriorityClass | None = Field(
        None,
        description="with engine_url: the run's class — its rows' vLLM priority (urgent 1, nightly 5, backfill 10; "
        "online traffic's 0 runs first; engine_priority overrides) and, with fleet_budget, its weight in the "
        "fleet's budget (4, 2, 1); needs a server run with --scheduling-policy priority",
    )
    fleet_budget: bool = Field(
        False,
        description="with online_ttft_slo_ms: share one budget of rows in flight with every Nightshift client of "
        "the server (runs, shard groups, serve's batches), kept as a Prefect global concurrency limit on "
        "PREFECT_API_URL's server; one AIMD step for the fleet, each client its fair share",
    )
    engine_unreachable_s: float = Field(
        120.0,
        gt=0,
        description="with engine_url: a server that has not answered for this long (refused, 429, 5xx, timeouts, "
        "retried with backoff meanwhile) ends the run retryably, every finished row kept (exit status 75)",
    )

    @field_validator("engine_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return engine_urls_checked(value)

    @field_validator("lora", mode="before")
    @classmethod
    def _adapters(cls, value) -> tuple[LoraAdapter, ...]:
        return lora_adapters(value)

    @model_validator(mode="after")
    def _fleet_needs_an_objective(self) -> Self:
        if self.priority_class and not self.engine_url:
            raise ValueError("priority_class orders rows on a shared server: give it with engine_url")
        if self.fleet_budget and (self.online_ttft_slo_ms is None or not self.engine_url):
            raise ValueError(
                "fleet_budget shares the rows in flight an online objective adapts: give it with engine_url and "
                "online_ttft_slo_ms"
            )
        return self

    @property
    def run_priority(self) -> int | None:
        """The vLLM priority of the run's rows: engine_priority, else its class's."""
        if self.engine_priority is not None:
            return self.engine_priority
        return PRIORITY_CLASSES[self.priority_class][0] if self.priority_class else None

    @property
    def fleet_weight(self) -> int:
        """The run's weight in a fleet budget: its class's (nightly's without one)."""
        return PRIORITY_CLASSES[self.priority_class or "nightly"][1]

    @property
    def engine_urls(self) -> list[str]:
        """The servers of engine_url, in the order this engine tries them."""
        return self.engine_url.split(",") if self.engine_url else []

    def spread_over_servers(self, key: str) -> Self:
        """This config with its servers rotated by `key` (a shard group): groups spread over a
        fleet, each the same way in every attempt, the others still there to fall back on."""
        urls = self.engine_urls
        if len(urls) < 2:
            return self
        first = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(urls)
        return self.model_copy(update={"engine_url": ",".join(urls[first:] + urls[:first])})


# The fields above that are Nightshift's, not arguments of vLLM's LLM(...).
NIGHTSHIFT_ENGINE_FIELDS = frozenset(
    {
        "engine_start_timeout_s",
        "engine_url",
        "engine_api_key_secret",
        "engine_max_concurrency",
        "engine_priority",
        "row_priority_floor",
        "online_ttft_slo_ms",
        "fleet_budget",
        "priority_class",
        "engine_unreachable_s",
        "lora",  # vLLM takes enable_lora and sizes; the adapters go with each row (nightshift.engine.local)
        "engine_args",  # merged into the arguments as they are (engine_sizing.engine_arguments)
    }
)


class EngineConfig(EngineSettings):
    """The engine for one model: the settings plus the model's directory (or engine-resolved name)."""

    model: str = Field(description="model directory (or a name the engine resolves)")


class JobOptions(_Config):
    """What a job adds to its engine: names, checkpoint granularity, policies."""

    served_model_name: str | None = Field(
        None,
        description="model name written into responses and matched against each body's model (default: the model's)",
    )
    chunk_size: int = Field(512, gt=0, description="rows per chunk file: the most a kill can lose per shard in flight")
    model_mismatch: Literal["error", "ignore"] = Field(
        "error", description="a row whose body names another model: reject it (error) or run it anyway (ignore)"
    )
    result_cache: str | None = Field(
        None,
        description="directory of deterministic rows' outputs reused across runs (not part of the fingerprint: "
        "using it changes no output)",
    )
    keep_order: bool = Field(
        False,
        description="send a shard's rows to the engine in input order, not grouped by shared prompt prefix, and cut "
        "shards as input slices (outputs are in input order either way)",
    )
    tool_call_parser: str | None = Field(
        "auto",
        description="vLLM's tool-call parser for rows with tools (hermes, llama3_json, mistral, ...): auto picks the "
        "model family's from its chat template (hermes where it names none); forced tool_choice is "
        "honoured by structured decoding whichever parser",
    )
    shard_slices: bool = Field(
        False,
        description="cut shards as consecutive input slices even where gathering rows that share a prompt prefix "
        "into one shard would serve more from the prefix cache (rows are still grouped inside each shard)",
    )

    media_sources: Literal["any", "allowed"] = Field(
        "any",
        description="what an image_url of a row may name: any (the operator's own rows: any path, bucket or URL) or "
        "allowed (a Batch API tenant's rows: data: URLs and only the allow_media_root / allow_media_url sources, "
        "read here and sent inline; nightshift.wire.media)",
    )
    allow_media_root: tuple[str, ...] = Field(
        (), description="a local directory rows may name media in (repeatable; implies media_sources=allowed)"
    )
    allow_media_url: tuple[str, ...] = Field(
        (),
        description="a URL prefix rows may name media under, s3://bucket/prefix/ or https://host/path/ (repeatable; "
        "implies media_sources=allowed)",
    )
    max_media_per_row: int = Field(16, gt=0, description="image parts one row may hold")
    max_image_pixels: int = Field(40_000_000, gt=0, description="an image's width × height, read from its header")

    @model_validator(mode="before")
    @classmethod
    def _allowing_means_allowed(cls, values):
        if isinstance(values, dict) and (values.get("allow_media_root") or values.get("allow_media_url")):
            values = {**values, "media_sources": "allowed"}
        return values

    @field_validator("allow_media_url", mode="before")
    @classmethod
    def _prefixes(cls, value):
        from nightshift.wire.media import normalized_prefix

        value = [value] if isinstance(value, str) else list(value or ())
        return tuple(normalized_prefix(prefix) for prefix in value)

    @field_validator("allow_media_root", mode="before")
    @classmethod
    def _roots(cls, value):
        value = [value] if isinstance(value, str) else list(value or ())
        if any(not os.path.isabs(os.path.expanduser(root)) for root in value):
            raise ValueError("an allowed media root is an absolute directory")
        return tuple(value)

    @property
    def regroup_shards(self) -> bool:
        """Whether the plan may cut shards on prompt-prefix groups (nightshift/stages/plan.py)."""
        return not (self.keep_order or self.shard_slices)


class JobSpec(JobOptions):
    """Everything that decides what a shard's outputs are, besides the shard's rows."""

    engine: EngineConfig
    served_model_name: str
    model_identity: str = Field(description="weights checksum, or path + size + mtime of the weight files")

    def adapter_names(self) -> set[str]:
        return {adapter.name for adapter in self.engine.lora}

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump())

    @classmethod
    def load(cls, path: Path) -> JobSpec:
        from nightshift.runtime.storage import location

        return cls.model_validate_json(location(path).read_text())

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
                **({"adapters": {a.name: a.identity for a in self.engine.lora}} if self.engine.lora else {}),
                **({"tool_call_parser": self.tool_call_parser} if self.tool_call_parser != "auto" else {}),
                **({"engine_args": list(self.engine.engine_args)} if self.engine.engine_args else {}),
                # a server's answers are not mixed with this machine's engine's: its weights are its own
                **({"engine": "remote"} if self.engine.engine_url else {}),
            }
        )

    def fingerprint(self) -> str:
        """A hash of every setting that changes a shard's generated files (not of engine sizing)."""
        return _digest(
            {"output": self.output_fingerprint(), "chunk_size": self.chunk_size, "model_mismatch": self.model_mismatch}
        )


class CorpusOptions(_Config):
    """How corpus records (Parquet, CSV, JSONL) become chat or embedding requests."""

    task: Literal["chat", "embed"] = Field(
        "chat", description="chat: one completion per record; embed: one vector per record (embeddings.parquet)"
    )
    normalize: bool | None = Field(None, description="embed: L2-normalise the vectors (default: the model's own)")
    id_column: str | None = Field(None, description="column holding each record's id (default: row-<n>)")
    text_column: str = Field("text", description="column holding the text")
    image_column: str | None = Field(
        None,
        description="column holding each record's image for a vision-language model: bytes, or a path or URL "
        "(local, s3://, https://)",
    )
    template: str = Field("{text}", description="user prompt; {text} is replaced by the record's text")
    system: str | None = Field(None, description="system prompt")
    max_tokens: int | None = Field(256, gt=0, description="completion tokens per record")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")


class CanaryConfig(_Config):
    """What the canary stage checks and how strictly it gates the run."""

    canaries: str | None = Field(None, description="canary file: requests with expectations (docs/canaries.md)")
    min_pass_rate: float = Field(1.0, ge=0, le=1, description="share of canaries whose expectations must hold")
    oracle_model: str | None = Field(None, description="reference weights for the oracle (default: the job's model)")
    oracle_lora: tuple[LoraAdapter, ...] = Field(
        (),
        description="a reference LoRA adapter for the oracle, NAME=PATH (repeatable; default: the job's own adapter "
        "of that name): an adapter row is scored on the base model with it merged",
    )
    oracle_samples: int = Field(3, ge=0, description="greedy rows re-computed with transformers (0: off)")
    oracle_tokens: int = Field(16, gt=0, description="first tokens of each sample scored under the reference")
    oracle_top_k: int = Field(
        5, gt=0, description="each run token must be among the reference's top k at its position (teacher-forced)"
    )
    oracle_logprob_tolerance: float = Field(
        2.0, gt=0, description="…and within this many nats of the reference's most likely token"
    )
    oracle_min_agreement: float = Field(1.0, ge=0, le=1, description="share of oracle samples that must agree")
    embedding_min_cosine: float = Field(
        0.999, ge=-1, le=1, description="embeddings: cosine each sampled vector must reach against the reference"
    )
    determinism_samples: int = Field(2, ge=0, description="rows re-run through the engine with the same seed (0: off)")
    settings_gate: tuple[str, ...] = Field(
        (),
        description="the throughput-settings gate's contrast, KEY=VALUE (repeatable; an engine setting or vLLM engine "
        "argument, e.g. kv_cache_dtype=auto, max_num_seqs=1): greedy rows are scored again, teacher-forced, on an "
        "engine with it; none given: on the run's engine one row at a time (another batch composition)",
    )
    settings_gate_samples: int = Field(
        3, ge=0, description="greedy rows the throughput-settings gate scores (0: off; within the oracle's tolerance)"
    )
    require_validation: bool = Field(
        False,
        description="a run no check applied to (completions or sampled rows only, say) fails the gate (exit 3) "
        "instead of ending 'not validated' (exit 0)",
    )

    @field_validator("settings_gate", mode="before")
    @classmethod
    def _setting(cls, value) -> tuple[str, ...]:
        pairs = key_value_pairs(value)
        return tuple(f"{key}={json.dumps(pairs[key], sort_keys=True)}" for key in sorted(pairs))

    @property
    def settings_gate_values(self) -> dict[str, object]:
        return key_value_pairs(self.settings_gate)

    @field_validator("oracle_lora", mode="before")
    @classmethod
    def _adapters(cls, value) -> tuple[LoraAdapter, ...]:
        return lora_adapters(value)

    def reference(self, job: JobSpec) -> str:
        """The weights the oracle scores the run against: `oracle_model`, else the job's own."""
        return self.oracle_model or job.engine.model

    def reference_adapter(self, job: JobSpec, name: str) -> LoraAdapter:
        """The adapter merged into the reference for rows of adapter `name`: `oracle_lora`'s of
        that name, else the job's own."""
        given = {adapter.name: adapter for adapter in self.oracle_lora}
        return given.get(name) or next(adapter for adapter in job.engine.lora if adapter.name == name)


class FanOut(_Config):
    """Where and how shard groups are dispatched (the flow's `fan_out` parameter)."""

    deployment: str = Field(description='the shard-generation deployment, "nightshift-generate-shards/gpu"')
    validation_deployment: str | None = Field(
        "nightshift-validate/gpu",
        description="the canary checks' deployment on the GPU pool, where an engine and the reference fit "
        "(None: validate in the orchestrating flow)",
    )
    shards_per_group: int = Field(4, gt=0, description="shards per child run: one engine load generates them all")
    max_in_flight: int = Field(8, gt=0, description="child runs live at once; match the pool's GPUs")
    straggler_factor: float = Field(3.0, ge=1, description="re-issue a group running longer than this × the median")
    straggler_min_s: float = Field(300.0, ge=0, description="…and longer than this: short groups are not worth it")
    heartbeat_timeout_s: float = Field(
        120.0, gt=0, description="a running child whose heartbeat has not changed for this long has lost its worker"
    )
    start_timeout_s: float = Field(
        900.0, gt=0, description="a child taken by a worker (Pending) but not started for this long has lost it"
    )
    max_attempts: int = Field(3, gt=0, description="child runs per group that may fail before the stage fails")
    poll_s: float = Field(2.0, gt=0, description="seconds between looks at the child runs")


class RuntimeSettings(_Config):
    """Process-wide settings an operator or a drill gives in the environment, NIGHTSHIFT_<NAME>."""

    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="a run directory's lease not renewed for this long, by the observer's own clock, is presumed "
        "dead and may be taken over (NIGHTSHIFT_LEASE_TTL_S); the holder renews it every ttl/4, at most 5 s",
    )
    sigterm_grace_s: float = Field(
        20.0, ge=0, description="on SIGTERM, seconds the rows in flight get to finish (NIGHTSHIFT_SIGTERM_GRACE_S)"
    )
    shared_prefect_idle_s: float = Field(
        30.0,
        ge=0,
        description="the machine's shared temporary Prefect server (runs with no PREFECT_API_URL) stops after this "
        "long with no run using it (NIGHTSHIFT_SHARED_PREFECT_IDLE_S)",
    )

    @classmethod
    def from_environment(cls) -> RuntimeSettings:
        variables = {name: f"NIGHTSHIFT_{name.upper()}" for name in cls.model_fields}
        given = {name: os.environ[variable] for name, variable in variables.items() if variable in os.environ}
        try:
            return cls(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigurationError(f"NIGHTSHIFT_{str(first['loc'][0]).upper()}: {first['msg']}") from None


class BatchApiConfig(_Config):
    """`nightshift serve`: OpenAI's /v1/files and /v1/batches, each batch a Nightshift run."""

    host: str = Field("127.0.0.1", description="address to listen on (another address exposes the API)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    storage: str = Field(
        "nightshift-api", description="files, batches and their run directories: a directory or an s3:// prefix"
    )
    deployment: str | None = Field(
        None,
        description="a batch deployment (nightshift-batch/nightly): each batch becomes a flow run there, taken by "
        "its work pool, its run directory in the storage (shared with the workers); default: a run on this machine",
    )
    chat_model: str = Field("smollm2", description="model of /v1/chat/completions and /v1/completions batches")
    embedding_model: str = Field("minilm", description="model of /v1/embeddings batches")
    chat_engine_url: str | None = Field(
        None,
        description="an OpenAI-compatible server (or several, comma-separated) answering the chat and completions "
        "batches' rows instead of an engine the run starts (see engine_url)",
    )
    embedding_engine_url: str | None = Field(
        None, description="the same for /v1/embeddings batches: a server of the embedding model"
    )
    shared_engine: bool = Field(
        False,
        description="start one vLLM server of chat_model on this machine and send every chat and completions batch's "
        "rows to it, so the batches running at once share one engine instead of each starting its own "
        "(docs/batch-api.md); default: an engine per run",
    )
    chat_lora: tuple[LoraAdapter, ...] = Field(
        (),
        description="a LoRA adapter of the chat model, NAME=PATH (repeatable): a batch's rows naming it as their "
        "model are generated with it",
    )

    @field_validator("chat_lora", mode="before")
    @classmethod
    def _adapters(cls, value) -> tuple[LoraAdapter, ...]:
        return lora_adapters(value)

    allow_media_root: tuple[str, ...] = Field(
        (),
        description="a directory of this machine whose files the batches' image_url parts may name (repeatable; "
        "default: none — tenants' rows may carry data: URLs only; docs/security.md)",
    )
    allow_media_url: tuple[str, ...] = Field(
        (),
        description="a URL prefix the batches' image_url parts may name, s3://bucket/prefix/ or https://host/path/ "
        "(repeatable; read by the run with its timeout and bounds, never by the engine; default: none)",
    )
    row_priority_floor: int | None = Field(
        None,
        description="with an engine server: a row's own `priority` is honoured, raised to at least this value (and "
        "engine_priority): lower runs first, so no row jumps ahead of online traffic; default: ignored",
    )
    engine_api_key_secret: str | None = Field(
        None, description="a Prefect Secret block with the engine servers' key (default: $NIGHTSHIFT_ENGINE_API_KEY)"
    )
    online_ttft_slo_ms: float | None = Field(
        None,
        gt=0,
        description="with chat_engine_url: the batches' rows in flight adapt to keep the server's online traffic's "
        "time to first token within this many ms (docs/sharing-a-fleet.md); default: flat out",
    )
    priority_class: PriorityClass | None = Field(
        None,
        description="with an engine server: the batches' class — their rows' vLLM priority (urgent 1, nightly 5, "
        f"backfill 10, after online traffic's 0) and their weight in a fleet budget (4, 2, 1); a batch may ask a "
        f"lower one in its metadata ({BATCH_CLASS_KEY}), never a higher; default: none (nightly's weight)",
    )
    fleet_budget: bool = Field(
        False,
        description="with online_ttft_slo_ms: the batches share one budget of rows in flight with every other "
        "Nightshift client of the chat server, kept in Prefect (docs/sharing-a-fleet.md)",
    )

    @field_validator("chat_engine_url", "embedding_engine_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return engine_urls_checked(value)

    @field_validator("allow_media_url", "allow_media_root", mode="before")
    @classmethod
    def _media(cls, value, info):
        checked = JobOptions.model_validate({info.field_name: value or ()})  # the run's own checks
        return getattr(checked, info.field_name)

    api_key_secret: str | None = Field(
        None, description="a Prefect Secret block holding the API keys, comma-separated (default: $NIGHTSHIFT_API_KEYS)"
    )
    webhook_url: tuple[str, ...] = Field(
        (),
        description="an endpoint told of each batch that ends (batch.completed, .failed, .expired, .cancelled), "
        "signed as OpenAI signs its webhooks (repeatable; docs/batch-api.md); default: none",
    )
    webhook_secret_block: str | None = Field(
        None,
        description="a Prefect Secret block with the webhooks' signing secret (default: $NIGHTSHIFT_WEBHOOK_SECRET)",
    )

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _webhook_urls(cls, value) -> tuple[str, ...]:
        urls = tuple(value or ())
        for url in urls:
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"webhook_url {url!r} is not an http:// or https:// URL")
        return urls

    @model_validator(mode="after")
    def _fleet_needs_an_objective(self) -> Self:
        if self.shared_engine and (self.chat_engine_url or self.deployment or self.chat_lora):
            raise ValueError(
                "shared_engine starts a server of chat_model on this machine for this machine's runs: not with "
                "chat_engine_url (a server already), deployment (runs on other machines) or chat_lora (give "
                "chat_engine_url of a server started with --lora-modules)"
            )
        if self.online_ttft_slo_ms is not None and not (self.chat_engine_url or self.shared_engine):
            raise ValueError(
                "online_ttft_slo_ms is kept on a shared chat server: give chat_engine_url or shared_engine"
            )
        if self.fleet_budget and self.online_ttft_slo_ms is None:
            raise ValueError(
                "fleet_budget shares the rows in flight an online objective adapts: give online_ttft_slo_ms"
            )
        return self

    max_file_bytes: int = Field(200 * 1024**2, gt=0, description="largest upload, as OpenAI's 200 MB")
    max_requests: int = Field(50_000, gt=0, description="most requests in one batch, as OpenAI's 50,000")
    max_attempts: int = Field(3, gt=0, description="runs of one batch that may crash (then resume) before it fails")
    max_running_batches: int = Field(
        1,
        gt=0,
        description="batches run at once on this machine, the key with the fewest running first (docs/batch-api.md); "
        "each run starts an engine of its own unless chat_engine_url/embedding_engine_url serve them all",
    )
    shortest_batch_first: bool = Field(
        False,
        description="with an engine server run with --scheduling-policy priority: a batch's rows are sent with a "
        "priority growing with its size (over row_priority_floor), so a small batch passes a large one there",
    )
    max_active_batches_per_key: int | None = Field(
        None, gt=0, description="batches one API key may have in progress at once (then 429); default: no cap"
    )
    max_body_bytes: int = Field(
        1024**2, gt=0, description="largest JSON request body (POST /v1/batches); larger ones are refused unread"
    )
    retention: str | None = Field(
        None,
        description="remove files and finished batches (with their run directories) this long after they were "
        'created, as OpenAI expires its files: "30d"; default: keep everything',
    )

    @field_validator("retention")
    @classmethod
    def _a_retention(cls, value: str | None) -> str | None:
        if value is not None and retention_seconds(value) is None:
            raise ValueError(f'retention {value!r} is not a duration like "30d", "12h" or "90m"')
        return value

    @property
    def retention_s(self) -> int | None:
        return retention_seconds(self.retention) if self.retention else None

    poll_s: float = Field(1.0, gt=0, description="seconds between the runner's looks at the batches")


def retention_seconds(value: str) -> int | None:
    """ "30d", "12h", "90m" as whole seconds (at least one); None if it is not such a duration."""
    duration = parse_duration(value)
    return int(duration.total_seconds()) if duration is not None and duration.total_seconds() >= 1 else None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
