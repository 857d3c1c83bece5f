"""How big a vLLM engine is made, from the model, the job and the host it starts on.

vLLM fills the sizes a config leaves open with its defaults for the hardware; on CPU those
defaults misjudge (a KV budget from the node's memory minus what it sees in use, one core for
the model on a 2-core machine), so Nightshift sizes CPU engines itself: the KV cache from the
model's config.json and the memory free now, the rows decoded together from what that cache
holds, every core for a machine's only engine. Nothing here imports vLLM's engine: the job's
planning and `nightshift plan` read it without loading one.
"""

from __future__ import annotations

import logging
import os

from nightshift.config import NIGHTSHIFT_ENGINE_FIELDS, EngineConfig
from nightshift.engine.vllm_adapter import platform_is_cpu

log = logging.getLogger("nightshift.engine")


# Eager, CUDA graphs or compiled, from what was measured on an H200 (docs/benchmarks.md, "Eager,
# graphs or compiled"): a Llama-3.1-8B-shaped model in bf16 decoded 1,500 rows × 256 tokens at
# 28,967 tokens/s eager, 31,897 with CUDA graphs of whole decode steps captured without
# torch.compile (the capture: 7 s, 1 GiB), and 30,450 compiled (torch.compile and piecewise
# graphs: 34 s more at start, cold cache). Compiling never paid; graphs pay once the decode is
# expected to take longer than GRAPHS_COST_S / GRAPHS_GAIN (76 s on one GPU). On CPU, neither
# made decoding faster here, so CPU engines stay eager.
GRAPHS_COST_S = 7.0
GRAPHS_GAIN = 1 - 28_967 / 31_897
# CUDA graphs of whole decode steps, captured without torch.compile (vLLM's compilation_config)
GRAPHS_WITHOUT_COMPILE = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
MEASURED_OUTPUT_TOKENS_S = 12_847.0  # 8B, bf16, one H200, 1,500 rows of 256 tokens, eager
MEASURED_PARAMS = 8.0e9
TOKENS_PER_ROW = 256  # a row's expected completion when only the row count is known (CorpusOptions' default)
GPU_MEMORY_SHARE = 0.9  # a card of its own, as vLLM's default
CPU_MEMORY_SHARE = 0.2  # of the memory free, at most, for a CPU engine's KV cache


def with_platform_defaults(config: EngineConfig, on_cpu: bool | None = None) -> EngineConfig:
    """The config with what it leaves to the platform filled: float32 on CPU (bf16 is emulated
    there, 3× slower) and the model's own dtype on a GPU; 0.9 of a GPU's memory (the CPU's KV
    budget is sized from free memory: cpu_kv_cache_bytes)."""
    on_cpu = platform_is_cpu() if on_cpu is None else on_cpu
    update = {}
    if config.dtype is None:
        update["dtype"] = "float32" if on_cpu else "auto"
    if config.gpu_memory_utilization is None and not on_cpu:
        update["gpu_memory_utilization"] = GPU_MEMORY_SHARE
    return config.model_copy(update=update) if update else config


def check_fits_gpu(config: EngineConfig) -> None:
    """Refuse, before vLLM allocates anything, a model whose weights alone exceed the share of
    the card(s) the engine may take — said with the arithmetic (ConfigurationError, exit 2),
    not as a CUDA out-of-memory error minutes into the start."""
    import torch

    from nightshift.errors import ConfigurationError
    from nightshift.models import local_model, weight_bytes

    if not torch.cuda.is_available():
        return
    try:
        stored = weight_bytes(local_model(config.model))
    except (OSError, ValueError):
        return
    weights = stored * (2 if config.dtype in ("float32", "float") and not _stored_in_float32(config) else 1)
    card = torch.cuda.get_device_properties(0).total_memory
    share = config.gpu_memory_utilization or GPU_MEMORY_SHARE
    budget = share * card * config.tensor_parallel_size
    if weights > budget:
        raise ConfigurationError(
            f"the model's weights take {weights / GiB:.1f} GiB in {config.dtype}, more than gpu_memory_utilization "
            f"{share} × {card / GiB:.0f} GiB × {config.tensor_parallel_size} GPU(s) = {budget / GiB:.1f} GiB: "
            "raise --gpu-memory-utilization, use --dtype bfloat16 / auto, quantize, or --tensor-parallel-size"
        )


def _stored_in_float32(config: EngineConfig) -> bool:
    model = _model_json(config) or {}
    return str(model.get("torch_dtype") or model.get("dtype") or "").endswith("float32")


def expected_decode_seconds(config: EngineConfig, rows: int) -> float:
    """A job's decode time on one GPU as measured for an 8B model, scaled by the model's size."""
    from nightshift.models import local_model, weight_bytes

    try:
        params = weight_bytes(local_model(config.model)) / 2  # 16-bit checkpoints
    except (OSError, ValueError):
        params = MEASURED_PARAMS
    rate = MEASURED_OUTPUT_TOKENS_S * MEASURED_PARAMS / max(params, 1e8)
    return rows * TOKENS_PER_ROW / rate / config.tensor_parallel_size


def choose_enforce_eager(config: EngineConfig, rows: int | None) -> EngineConfig:
    """The config with eager or CUDA graphs decided, if the user left it open: on a GPU, graphs
    captured without torch.compile when the job's expected decode is long enough for the capture
    to pay (or its size is unknown); eager on CPU and for shorter jobs. A user's own
    compilation_config (--engine-arg) or --no-enforce-eager (vLLM's compiled default) stands."""
    if config.enforce_eager is not None:
        return config
    if platform_is_cpu():
        return config.model_copy(update={"enforce_eager": True})
    pays = rows is None or expected_decode_seconds(config, rows) * GRAPHS_GAIN > GRAPHS_COST_S
    if not pays:
        return config.model_copy(update={"enforce_eager": True})
    arguments = {"compilation_config": GRAPHS_WITHOUT_COMPILE} | config.engine_arg_values  # the user's own stands
    return config.with_engine_args(arguments).model_copy(update={"enforce_eager": False})


def engine_arguments(config: EngineConfig) -> dict:
    """`LLM(...)` keyword arguments: the config's settings, vLLM's defaults for what it leaves
    open, and on CPU an explicit KV-cache size."""
    from nightshift.models import local_model

    on_cpu = platform_is_cpu()
    config = with_platform_defaults(config, on_cpu)
    if not on_cpu:
        check_fits_gpu(config)
    arguments = config.model_dump(exclude_none=True, exclude=NIGHTSHIFT_ENGINE_FIELDS) | config.engine_arg_values
    arguments["model"] = local_model(config.model)  # an s3:// model: this machine's fetched copy
    arguments.setdefault("enforce_eager", True)  # a config that nobody sized for its job: start fast
    arguments.setdefault("max_model_len", -1)  # the model's own context, lowered only if memory requires
    if config.lora:
        from nightshift.engine.lora import engine_lora_rank, local_adapter

        # Every adapter resident at once (a batch mixes them freely, none is swapped in mid-run),
        # and one slot more, always empty: with every slot taken, vLLM 0.32's CPU build decoded
        # base-model rows with the last slot's adapter (a base row beside rows of two adapters:
        # its first token right, the rest the adapter's — the canary stage's oracle caught it).
        arguments.update(
            enable_lora=True,
            max_loras=len(config.lora) + 1,
            max_cpu_loras=len(config.lora) + 1,
            max_lora_rank=engine_lora_rank([local_adapter(adapter) for adapter in config.lora]),
        )
    if on_cpu:
        kv_bytes = config.kv_cache_memory_bytes
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_bytes = kv_bytes or int(float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB)
        elif kv_bytes is None:
            kv_bytes = arguments["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config)
        if config.max_num_seqs is None:
            arguments["max_num_seqs"] = cpu_max_num_seqs(config, kv_bytes)
    return arguments


# On CPU, rows decoded together: as many as the KV cache holds at CPU_ROW_TOKENS tokens each
# (twice a typical batch row: a cache too full preempts rows, and recomputing them costs more),
# between vLLM's CPU default and its largest GPU default. Each engine step costs a fixed
# overhead on top of its matrix work, so wider steps are cheaper per token: the tiny model
# made 17 % more tokens/s at 1,024 than at 256 (docs/benchmarks.md).
CPU_MAX_NUM_SEQS = (256, 1024)
CPU_ROW_TOKENS = 512


def cpu_max_num_seqs(config: EngineConfig, kv_bytes: int) -> int:
    per_token = kv_bytes_per_token(config)
    if not per_token:
        return CPU_MAX_NUM_SEQS[0]
    fits = kv_bytes // (per_token * CPU_ROW_TOKENS)
    return int(min(CPU_MAX_NUM_SEQS[1], max(CPU_MAX_NUM_SEQS[0], fits)))


GiB = 1 << 30


def use_every_cpu_core() -> None:
    """Give a CPU engine's worker every core of this process when it is the machine's only engine.

    vLLM's CPU default binds its worker's OpenMP threads to all cores but one, which it keeps
    for its scheduler: on a 2-core machine the model runs on one core. For a machine's only
    engine the gain is large (MiniLM embeddings 43 → 82 docs/s on 2 cores; docs/embeddings.md).
    Engines that share a machine (several workers on one host) would spin on the same cores and
    starve each other, so an engine that finds another vLLM engine already running here keeps
    vLLM's default. NIGHTSHIFT_CPU_ALL_CORES=1 forces every core, =0 keeps vLLM's default (what
    a host that starts several CPU engines at once should set); an operator's own
    VLLM_CPU_OMP_THREADS_BIND wins over both."""
    wanted = os.environ.get("NIGHTSHIFT_CPU_ALL_CORES", "auto")
    if wanted == "0" or not platform_is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    if wanted != "1" and other_engines_running():
        log.info("another vLLM engine runs on this machine: keeping vLLM's default CPU binding")
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores)


def other_engines_running() -> bool:
    """Whether a vLLM engine process (they name themselves VLLM::…) runs on this machine."""
    import psutil

    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            title = process.info["name"] or ""
            command = " ".join(process.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if title.startswith("VLLM::") or command.startswith("VLLM::"):
            return True
    return False


def memory_picture(arguments: dict) -> str:
    """Free memory against what the engine was asked to take, and who holds the rest: what an
    operator needs when an engine refuses to start."""
    import psutil

    asked = arguments.get("kv_cache_memory_bytes")
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        asked = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    holders = []
    for process in psutil.process_iter(["pid", "name", "memory_info"]):
        info = process.info
        if info.get("memory_info"):
            holders.append((info["memory_info"].rss, info["name"], info["pid"]))
    top = ", ".join(f"{name} (pid {pid}) {rss / GiB:.1f} GiB" for rss, name, pid in sorted(holders, reverse=True)[:3])
    kv = (
        f"KV cache asked {asked / GiB:.1f} GiB"
        if asked
        else f"gpu_memory_utilization {arguments.get('gpu_memory_utilization')}"
    )
    return f"memory free {psutil.virtual_memory().available / GiB:.1f} GiB, {kv}; largest processes: {top}"


def cpu_kv_cache_bytes(config: EngineConfig, available: int | None = None) -> int:
    """The KV cache a CPU engine gets: enough for every sequence at full context, at most
    `gpu_memory_utilization` × the memory free right now, and at least one full-length sequence.

    vLLM on CPU otherwise budgets `gpu_memory_utilization` × the node's memory *minus what it
    sees in use*, so an engine starting beside another gets a negative budget and refuses to start.
    """
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    per_token = kv_bytes_per_token(config)
    share = config.gpu_memory_utilization or CPU_MEMORY_SHARE
    if per_token is None:
        return max(GiB, int(min(4 * GiB, share * available)))
    context = config.max_model_len or model_context(config) or 2048
    wanted = per_token * context * (config.max_num_seqs or 256)
    # an explicit context must fit one whole sequence; the model's own is fitted to the cache by vLLM
    floor = (per_token * context if config.max_model_len else 0) + 64 * (1 << 20)
    return int(max(floor, min(wanted, share * available)))


def model_context(config: EngineConfig) -> int | None:
    """The model's context length from its config.json, as vLLM reads it first."""
    model = _model_json(config)
    value = model.get("max_position_embeddings") if model else None
    return int(value) if value else None


def _model_json(config: EngineConfig) -> dict | None:
    import json
    from pathlib import Path

    from nightshift.models import local_model

    try:
        model = json.loads((Path(local_model(config.model)) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return model.get("text_config", model)


def kv_bytes_per_token(config: EngineConfig) -> int | None:
    """K and V of every layer for one token, from the model's config.json (None if unknown)."""
    model = _model_json(config)
    try:
        layers = model["num_hidden_layers"]
        heads = model.get("num_key_value_heads") or model["num_attention_heads"]
        head_dim = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    dtype = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else with_platform_defaults(config).dtype
    width = 1 if "fp8" in dtype or "int8" in dtype else 4 if dtype in ("float32", "float") else 2
    return 2 * layers * heads * head_dim * width


# Below this many rows decoded together a GPU waits on the scheduler more than it computes.
GPU_MAX_NUM_SEQS_FLOOR = 64


def throughput_traps(settings: dict, on_gpu: bool) -> list[str]:
    """Known ways an engine's resolved settings (vllm_adapter.resolved_settings) throw
    throughput away, each said in a line an operator can act on."""
    traps = []
    if on_gpu and settings.get("max_num_seqs", GPU_MAX_NUM_SEQS_FLOOR) < GPU_MAX_NUM_SEQS_FLOOR:
        traps.append(
            f"max_num_seqs {settings['max_num_seqs']} on a GPU: the GPU waits between small batches "
            "(vLLM's offline default is 256 or more; leave max_num_seqs unset)"
        )
    if on_gpu and settings.get("dtype") == "float32":
        traps.append("float32 on a GPU: twice the memory and a fraction of the speed (leave --dtype unset: auto)")
    if on_gpu and (settings.get("gpu_memory_utilization") or 1) < 0.5:
        traps.append(
            f"gpu_memory_utilization {settings['gpu_memory_utilization']} on a GPU: a small KV cache decodes few rows "
            "at once (leave it unset: 0.9 of a card of its own)"
        )
    if on_gpu and settings.get("enforce_eager"):
        traps.append("eager mode on a GPU: CUDA graphs speed decoding up (leave enforce_eager unset for a big job)")
    if settings.get("enable_prefix_caching") is False:
        traps.append(
            "prefix caching is off: rows sharing a prompt prefix recompute it (`nightshift plan` predicts the share)"
        )
    return traps
