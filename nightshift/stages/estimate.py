"""Plan the night before spending it: tokens, hours, GPUs to finish by a deadline, and cost.

`nightshift plan` plans the input exactly as a run does (the same shards) and then, without
loading any weights into an engine:

* counts the prompt tokens of every valid row with the model's own tokenizer and chat
  template (the count a run reports as `prompt_tokens`), shard by shard, streaming;
* bounds the completion tokens by each row's `max_tokens` (× `n`; the context left when a
  row sets none), and estimates them from earlier runs of the same model where there are any
  (their completion tokens per finished row × this input's valid rows, within the bound);
* takes the throughput per GPU from earlier runs' reports with the same output fingerprint
  (model, weights, dtype, context) on the same accelerator — or from a calibration run on a
  sample when asked (`--calibrate N`) — and otherwise says "unknown", never a made-up figure;
* sizes the fleet for a deadline:

      W   = total tokens ÷ tokens/s per GPU            (seconds of work on one GPU)
      s   = largest shard's tokens ÷ tokens/s per GPU × straggler factor
      T   = seconds from now to the deadline
      GPUs = ⌈ W ÷ (T − s) ⌉

  A shard is the unit a GPU takes, so the last one to start can end up to `s` after the
  others: the fleet must finish the rest of the work by T − s. The straggler factor is the
  worst shard ÷ median shard measured in the history runs (1 without history). If T ≤ s
  no fleet finishes in time: the plan says so and shows how long the largest shard takes.
* prices it: GPU-hours of work (W × accelerators per engine) at the pricing block's on-demand
  and spot rates, and the same tokens at the managed batch APIs' prices.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from nightshift.config import JobSpec
from nightshift.records import CostReport, MisplacedSharedText, Plan
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, read_table, sql_path
from nightshift.stages.layout import PrefixCacheModel, expected_work, prefix_order
from nightshift.wire.openai_format import CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL


class TokenCount(BaseModel):
    """What the input holds, counted with the model's tokenizer."""

    rows: int
    valid_rows: int
    rejected_by_code: dict[str, int] = Field(default_factory=dict, description="rows the plan stage rejected")
    shards: int
    prompt_tokens: int
    completion_tokens_max: int = Field(description="the most the rows may generate: max_tokens × n, summed")
    embedding: bool = False
    shard_tokens_max: int = Field(0, description="prompt + completion bound of the largest shard")
    prefix_cache_hit_rate_predicted: float | None = Field(
        None, description="prompt tokens the prefix cache would serve, rows in the order generation sends them"
    )
    prefix_cache_hit_rate_input_order: float | None = Field(
        None, description="the same, rows in the input's order (what --keep-order would get)"
    )
    shards_regrouped: bool = Field(
        False, description="shards cut on shared prompt prefixes rather than as input slices (Plan.layout)"
    )
    misplaced_shared_text: MisplacedSharedText | None = Field(
        None, description="the template lint: text many rows share, placed after each row's own (no cache serves it)"
    )


class Throughput(BaseModel):
    """Tokens (prompt + completion) per second of one GPU (one engine), and where it comes from."""

    tokens_per_second: float
    source: str = Field(description='"history: N runs" or "calibration: N rows"')
    completion_per_row: float | None = Field(None, description="completion tokens per finished row, in the history")
    straggler_factor: float = Field(1.0, description="worst shard ÷ median shard in the history runs")
    computed_per_second: float | None = Field(
        None,
        description="tokens the engine computed per second — prompt tokens its prefix cache did not serve, plus "
        "completion tokens — in history runs that measured their hit rate: the rate a layout's predicted hit rate "
        "scales",
    )


def computed_tokens(prompt: int, completion: int, hit_rate: float | None) -> float:
    """Prompt tokens the prefix cache does not serve at `hit_rate`, plus every completion token."""
    return prompt * (1 - (hit_rate or 0.0)) + completion


class Estimate(BaseModel):
    model: str
    accelerator: str
    tokens: TokenCount
    completion_tokens_estimate: int
    completion_estimate_source: str
    throughput: Throughput | None
    hours_one_gpu: float | None = None
    hours_saved_by_layout: float | None = Field(
        None, description="one GPU's hours the layout's predicted hit rate saves against the input order's"
    )
    deadline: str | None = None
    hours_to_deadline: float | None = None
    gpus_needed: int | None = None
    finishes_in_time: bool | None = None
    why_not: str | None = None
    cost_on_demand: float | None = None
    cost_spot: float | None = None
    managed_api_cost: dict[str, float] = Field(default_factory=dict)


def count_tokens(
    plan: Plan,
    tokenizer,
    max_model_len: int | None,
    prefix_cache: tuple[int | None, int] | None = None,
    keep_order: bool = False,
) -> TokenCount:
    """Prompt tokens of every valid row of the plan's shards, as the engine will count them; with
    `prefix_cache` (capacity in tokens, block size), the prefix-cache hit rate predicted for the
    rows in input order and in the order generation sends them (nightshift/stages/layout.py)."""
    tally = _Tally()
    input_order, laid_out = (
        (PrefixCacheModel(*prefix_cache), PrefixCacheModel(*prefix_cache)) if prefix_cache else (None, None)
    )
    for shard in plan.shards:
        generative = tally.shard(shard, tokenizer, max_model_len)
        if input_order is not None:
            if plan.layout == "input-slices":  # the shards in plan order are the input order
                for _, ids, written, _ in generative:
                    input_order.run(ids, written)
            # the order the generate stage will give the engine (nightshift/stages/generate.py)
            layout = generative if keep_order else prefix_order(generative, lambda g: g[0], lambda g: g[3])
            for _, ids, written, _ in layout:
                laid_out.run(ids, written)
    if input_order is not None and plan.layout == "prefix-groups":
        for url, body in _requests_in_input_order(plan):
            ids = prompt_ids(url, body, tokenizer)
            if ids is not None:
                _, ids, written, _ = _cache_visit(body, ids, completion_bound(url, body, len(ids), max_model_len))
                input_order.run(ids, written)
    return TokenCount(
        rows=tally.rows,
        valid_rows=tally.valid,
        rejected_by_code=dict(tally.rejected.most_common()),
        shards=len(plan.shards),
        prompt_tokens=tally.prompt,
        completion_tokens_max=tally.bound,
        embedding=tally.embedding,
        shard_tokens_max=tally.largest,
        prefix_cache_hit_rate_predicted=laid_out.hit_rate if laid_out else None,
        prefix_cache_hit_rate_input_order=input_order.hit_rate if input_order else None,
        shards_regrouped=plan.layout == "prefix-groups",
        misplaced_shared_text=plan.misplaced_shared_text,
    )


class _Tally:
    """The counts of count_tokens, shard by shard."""

    def __init__(self) -> None:
        self.rows = self.valid = self.prompt = self.bound = self.largest = 0
        self.rejected: Counter = Counter()
        self.embedding = False

    def shard(self, shard, tokenizer, max_model_len: int | None) -> list[tuple]:
        """Count one shard's rows; returns its generative rows as (layout key, prompt ids, tokens
        it may write, tokens it is expected to) for the prefix-cache model."""
        table = read_table(shard.path, columns=["request", "error"])
        shard_tokens = 0
        generative: list[tuple] = []
        for request, error in zip(table["request"].to_pylist(), table["error"].to_pylist()):
            self.rows += 1
            if error is not None:
                self.rejected[json.loads(error)["code"]] += 1
                continue
            self.valid += 1
            request = json.loads(request)
            url, body = request["url"], request.get("body") or {}
            ids = prompt_ids(url, body, tokenizer)
            tokens = len(ids) if ids is not None else prompt_tokens(url, body, tokenizer, max_model_len)
            most = completion_bound(url, body, tokens, max_model_len)
            self.embedding = self.embedding or url == EMBEDDINGS_URL
            self.prompt += tokens
            self.bound += most
            shard_tokens += tokens + most
            if ids is not None:
                generative.append(_cache_visit(body, ids, most))
        self.largest = max(self.largest, shard_tokens)
        return generative


def _cache_visit(body: dict, ids: list[int], most: int) -> tuple:
    """What a row does to the prefix cache: its layout key, prompt ids, the tokens it is taken
    to write (its expected work within its bound) and its expected work."""
    wanted = expected_work(body.get("max_completion_tokens") or body.get("max_tokens"))
    return body.get("messages", body.get("prompt")), ids, min(most, wanted), wanted


def _requests_in_input_order(plan: Plan):
    """(url, body) of the valid rows of shards regrouped by prefix, back in input order: DuckDB
    sorts them (on disk past its memory limit)."""
    files = ", ".join(f"'{sql_path(shard.path)}'" for shard in plan.shards)
    with duckdb_connection() as con:
        query = f"SELECT request FROM read_parquet([{files}]) WHERE error IS NULL ORDER BY row_index"
        for batch in con.sql(query).to_arrow_reader(4096):
            for request in batch.column(0).to_pylist():
                request = json.loads(request)
                yield request["url"], request.get("body") or {}


def prompt_ids(url: str, body: dict, tokenizer) -> list[int] | None:
    """The prompt's token ids as vLLM builds them: the chat template applied, then tokenized
    without adding special tokens again (chat); the prompt with them (completions). None for
    an embedding row."""
    if url == CHAT_URL:
        text = tokenizer.apply_chat_template(
            [_flat(message) for message in body.get("messages") or []],
            tokenize=False,
            add_generation_prompt=True,
            **(body.get("chat_template_kwargs") or {}),
        )
        return tokenizer.encode(text, add_special_tokens=False)
    if url == COMPLETIONS_URL:
        prompt = body.get("prompt")
        return list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt or "")
    return None


def prompt_tokens(url: str, body: dict, tokenizer, max_model_len: int | None) -> int:
    """What vLLM counts as the row's prompt: chat and completion rows as `prompt_ids` builds
    them; each input of an embedding row, truncated where the body asks."""
    ids = prompt_ids(url, body, tokenizer)
    if ids is not None:
        return len(ids)
    if url == EMBEDDINGS_URL:
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        truncate = body.get("truncate_prompt_tokens")
        limit = None if truncate is None else max_model_len if truncate == -1 else truncate
        total = 0
        for item in inputs or []:
            count = len(item) if isinstance(item, list) else len(tokenizer.encode(item))
            total += min(count, limit) if limit else count
        return total
    return 0


def _flat(message: dict) -> dict:
    """OpenAI content parts as the template sees them in vLLM: text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return {**message, "content": "\n".join(texts)}
    return message


def completion_bound(url: str, body: dict, prompt: int, max_model_len: int | None) -> int:
    if url == EMBEDDINGS_URL:
        return 0
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    if most is None:
        most = max((max_model_len or prompt) - prompt, 0)
    return int(most) * int(body.get("n") or 1)


def throughput_from_history(root: str | Path, job: JobSpec, accelerator: str) -> Throughput | None:
    """Tokens/s per GPU from earlier runs' reports under `root` (one run directory each) with
    this job's output fingerprint on this accelerator; None if there is none."""
    fingerprint = job.output_fingerprint()
    rates, per_row, stragglers, computed = [], [], [1.0], []
    for report_path in sorted(RunDir.reports_under(root), key=str):
        run = report_path.parent
        try:
            report = CostReport.load(report_path)
            earlier = JobSpec.load(RunDir(run).job)
        except (OSError, ValueError):
            continue
        if earlier.output_fingerprint() != fingerprint or report.accelerator != accelerator:
            continue
        if not report.tokens_per_second_per_engine or report.served_without_generating.rows:
            continue  # a run answered partly from a cache says nothing about the engine's speed
        rates.append(report.tokens_per_second_per_engine)
        all_tokens = report.prompt_tokens + report.completion_tokens
        if report.prefix_cache_hit_rate is not None and all_tokens:
            share = computed_tokens(report.prompt_tokens, report.completion_tokens, report.prefix_cache_hit_rate)
            computed.append(report.tokens_per_second_per_engine * share / all_tokens)
        stragglers += [s.times_median for s in report.stragglers if s.times_median]
        if report.completion_per_row is not None:
            per_row.append(report.completion_per_row)
    if not rates:
        return None
    return Throughput(
        tokens_per_second=round(sum(rates) / len(rates), 3),
        source=f"history: {len(rates)} earlier run{'s' if len(rates) > 1 else ''} of this model on {accelerator}",
        completion_per_row=round(sum(per_row) / len(per_row), 3) if per_row else None,
        straggler_factor=max(stragglers),
        computed_per_second=round(sum(computed) / len(computed), 3) if len(computed) == len(rates) else None,
    )


def managed_api_cost(
    prompt_tokens: int,
    completion_tokens: int,
    embedding: bool,
    prices: dict[str, dict[str, float]] | None,
    embedding_prices: dict[str, float] | None,
) -> dict[str, float]:
    """The same tokens at managed batch APIs' list prices ($ per 1M tokens): chat APIs' input and
    output prices, or, for an embedding job, the embedding APIs' input price."""
    if embedding:
        return {name: round(prompt_tokens / 1e6 * price, 6) for name, price in (embedding_prices or {}).items()}
    return {
        name: round(prompt_tokens / 1e6 * p["input"] + completion_tokens / 1e6 * p["output"], 6)
        for name, p in (prices or {}).items()
    }


def estimate(
    tokens: TokenCount,
    model: str,
    accelerator: str,
    throughput: Throughput | None,
    on_demand_per_hour: float | None,
    spot_per_hour: float | None,
    accelerators_per_engine: int = 1,
    managed_prices: dict[str, dict[str, float]] | None = None,
    embedding_prices: dict[str, float] | None = None,
    deadline: datetime | None = None,
    now: datetime | None = None,
) -> Estimate:
    """The arithmetic of the module docstring, on counted tokens and a measured throughput."""
    completion, completion_source = _completion_estimate(tokens, throughput)
    total = tokens.prompt_tokens + completion
    managed = managed_api_cost(tokens.prompt_tokens, completion, tokens.embedding, managed_prices, embedding_prices)
    result = Estimate(
        model=model,
        accelerator=accelerator,
        tokens=tokens,
        completion_tokens_estimate=completion,
        completion_estimate_source=completion_source,
        throughput=throughput,
        managed_api_cost=managed,
    )
    if deadline is not None:
        now = (now or datetime.now()).astimezone()
        result.deadline = deadline.isoformat(timespec="minutes")
        result.hours_to_deadline = round((deadline - now).total_seconds() / 3600, 4)
    if throughput is None:
        return result
    hit_rate = tokens.prefix_cache_hit_rate_predicted
    if throughput.computed_per_second and hit_rate is not None:
        # what the engine computes at the layout's hit rate, at the rate it computed in the history
        work_s = computed_tokens(tokens.prompt_tokens, completion, hit_rate) / throughput.computed_per_second
        in_input_order_s = (
            computed_tokens(tokens.prompt_tokens, completion, tokens.prefix_cache_hit_rate_input_order)
            / throughput.computed_per_second
        )
        result.hours_saved_by_layout = round(max(0.0, in_input_order_s - work_s) / 3600, 4)
    else:
        work_s = total / throughput.tokens_per_second
    gpu_hours = work_s / 3600 * accelerators_per_engine
    result.hours_one_gpu = round(work_s / 3600, 4)
    result.cost_on_demand = round(gpu_hours * on_demand_per_hour, 6) if on_demand_per_hour is not None else None
    result.cost_spot = round(gpu_hours * spot_per_hour, 6) if spot_per_hour is not None else None
    if deadline is not None:
        _fit_deadline(result, tokens, total, work_s, throughput, (deadline - now).total_seconds())
    return result


def _completion_estimate(tokens: TokenCount, throughput: Throughput | None) -> tuple[int, str]:
    """The completion tokens expected, and where the figure comes from."""
    if tokens.embedding:
        return 0, "embeddings: none"
    if throughput is not None and throughput.completion_per_row is not None:
        completion = min(tokens.completion_tokens_max, round(tokens.valid_rows * throughput.completion_per_row))
        return completion, f"{throughput.completion_per_row:,.1f} per row, as in the earlier runs"
    return tokens.completion_tokens_max, "the bound (max_tokens): no history"


def _fit_deadline(
    result: Estimate, tokens: TokenCount, total: int, work_s: float, throughput: Throughput, time_left_s: float
) -> None:
    """The GPUs that finish by the deadline, or why none can: the largest shard alone is too long."""
    # the shard's own share of the estimate: its bound scaled like the total's
    scale = total / (tokens.prompt_tokens + tokens.completion_tokens_max or 1)
    straggler_s = tokens.shard_tokens_max * scale * (work_s / total if total else 0.0) * throughput.straggler_factor
    if time_left_s <= straggler_s:
        result.finishes_in_time = False
        result.why_not = (
            f"the largest shard alone takes {straggler_s / 3600:.2f} h on one GPU, "
            f"and {max(time_left_s, 0) / 3600:.2f} h are left: use smaller shards or a later deadline"
        )
        return
    result.gpus_needed = max(1, math.ceil(work_s / (time_left_s - straggler_s)))
    result.finishes_in_time = True


def load_tokenizer(job: JobSpec):
    """The job's model's own tokenizer and chat template: what the engine will count with."""
    from transformers import AutoTokenizer

    from nightshift.models import local_model

    return AutoTokenizer.from_pretrained(local_model(job.engine.model, job.model_identity))


def prefix_cache_shape(job: JobSpec) -> tuple[int | None, int] | None:
    """(KV cache in tokens, block size) for the prefix-cache prediction: the cache this host's
    engine would get — set, or sized as a CPU engine sizes it; on a GPU unless set, unbounded —
    in vLLM's default blocks (16 tokens on GPUs, 128 on CPUs). None without prefix caching."""
    from nightshift.engine.sizing import cpu_kv_cache_bytes, kv_bytes_per_token, with_platform_defaults
    from nightshift.observe.telemetry import GpuSampler

    if job.engine.enable_prefix_caching is False:
        return None
    on_gpu = GpuSampler().gpu_count > 0
    engine = with_platform_defaults(job.engine, on_cpu=not on_gpu)
    per_token = kv_bytes_per_token(engine)
    budget = engine.kv_cache_memory_bytes or (None if on_gpu else cpu_kv_cache_bytes(engine))
    capacity = budget // per_token if budget and per_token else None
    return capacity, 16 if on_gpu else 128


def local_rate(pricing):
    """The price of this host's hardware as the pricing block has it (the card NVML names)."""
    from nightshift.observe.telemetry import GpuSampler

    sampler = GpuSampler()
    return pricing.rate(sampler.gpu_name, sampler.gpu_count)


def estimate_input(
    plan: Plan,
    job: JobSpec,
    pricing,
    managed,
    deadline: datetime | None = None,
    history: str | None = None,
    calibrate=None,
) -> Estimate:
    """The whole dry run over a planned input: tokens counted, throughput from `history` (or
    from `calibrate()`, a callable measuring it, when there is none), the arithmetic.
    `pricing` and `managed` are the GpuPricing and ManagedApiPrices blocks."""
    from nightshift.engine.sizing import model_context

    tokens = count_tokens(
        plan,
        load_tokenizer(job),
        job.engine.max_model_len or model_context(job.engine),
        prefix_cache_shape(job),
        job.keep_order,
    )
    rate = local_rate(pricing)
    throughput = throughput_from_history(history, job, rate.accelerator) if history else None
    if throughput is None and calibrate is not None:
        throughput = calibrate()
    return estimate(
        tokens,
        job.served_model_name,
        rate.accelerator,
        throughput,
        rate.on_demand,
        rate.spot,
        rate.count,
        managed.prices,
        managed.embedding_prices,
        deadline,
    )


def render(result: Estimate) -> str:
    """The plan as a Markdown table: the terminal's output and the Prefect artifact's."""
    t = result.tokens

    def money(value: float | None) -> str:
        if value is None:
            return "unknown"
        return f"${value:,.2f}" if value >= 100 else f"${value:,.4f}" if value >= 0.01 else f"${value:.6f}"

    rejected = ", ".join(f"{code}={n}" for code, n in t.rejected_by_code.items()) or "none"
    rate = result.throughput
    lines = [
        f"# Plan: {result.model} on {result.accelerator}",
        "",
        "| | |",
        "|---|---|",
        f"| rows | {t.rows:,} ({t.valid_rows:,} valid; rejected at planning: {rejected}) |",
        f"| shards | {t.shards:,} (largest: {t.shard_tokens_max:,} tokens at most) |",
        f"| prompt tokens (exact) | {t.prompt_tokens:,} |",
    ]
    if not t.embedding:
        lines.append(
            f"| completion tokens | ≤ {t.completion_tokens_max:,}; estimate {result.completion_tokens_estimate:,} "
            f"({result.completion_estimate_source}) |"
        )
    if t.prefix_cache_hit_rate_predicted is not None:
        lines.append(
            f"| prefix cache, predicted | {100 * t.prefix_cache_hit_rate_predicted:.1f} % of prompt tokens served "
            f"(in input order: {100 * (t.prefix_cache_hit_rate_input_order or 0):.1f} %) |"
        )
    if t.shards_regrouped:
        lines.append("| shard layout | cut on shared prompt prefixes: the rows of each prefix group run in one shard |")
    if t.misplaced_shared_text is not None:
        lines.append(f"| prompt layout | ⚠ {t.misplaced_shared_text.message()} |")
    lines.append(
        f"| throughput per GPU | {f'{rate.tokens_per_second:,.1f} tokens/s ({rate.source})' if rate else 'unknown: no earlier run of this model on this accelerator; --calibrate N measures it'} |"  # noqa: E501
    )
    lines.append(
        f"| hours on one GPU | {'unknown' if result.hours_one_gpu is None else f'{result.hours_one_gpu:,.2f}'} |"
    )
    if result.hours_saved_by_layout is not None:
        lines.append(
            f"| saved by the layout | {result.hours_saved_by_layout:,.2f} h on one GPU against the input order "
            "(the predicted hit rates, at the rate the history's engine computed uncached tokens) |"
        )
    if result.deadline:
        if result.gpus_needed is not None:
            fleet = f"**{result.gpus_needed}**"
        elif result.why_not:
            fleet = f"cannot finish in time: {result.why_not}"
        else:
            fleet = "unknown (throughput unknown)"
        lines.append(f"| deadline | {result.deadline} ({result.hours_to_deadline:,.2f} h from now) |")
        lines.append(f"| GPUs to finish by the deadline | {fleet} |")
    lines.append(f"| cost on demand / spot | {money(result.cost_on_demand)} / {money(result.cost_spot)} |")
    for name, cost in result.managed_api_cost.items():
        lines.append(f"| the same tokens at {name} | {money(cost)} |")
    return "\n".join(lines) + "\n"
