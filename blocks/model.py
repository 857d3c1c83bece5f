"""The model a job runs: one block per model configuration, named by deployments.

Save one in the Prefect UI (Blocks → "Nightshift Model") or in code:

    ModelConfig(model="/models/llama-3.1-8b-instruct", dtype="bfloat16",
                max_model_len=8192, max_num_seqs=256).save("llama-8b")

then run with `--param model=llama-8b`. Fields mirror vLLM's `LLM(...)` arguments.
"""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field

from nightshift.records import JobSpec


class ModelConfig(Block):
    """A model and the engine settings to serve it with."""

    _block_type_name = "Nightshift Model"
    _block_type_slug = "nightshift-model"

    model: str = Field("smollm2", description="bundled name (tiny, smollm2) or a model directory on the workers")
    served_model_name: str | None = Field(None, description="name written into responses (default: the model's)")
    dtype: str = Field("float32", description="float32 on CPU (bf16 is emulated there); bfloat16 on GPUs")
    max_model_len: int | None = Field(
        None, description="context length: prompt + completion tokens (default: the model's own, fitted to memory)"
    )
    max_num_seqs: int | None = Field(
        None, description="rows decoded together (default: vLLM's for the hardware, 256–1,024)"
    )
    max_num_batched_tokens: int | None = Field(
        None, description="tokens per engine step (default: vLLM's for the hardware)"
    )
    tensor_parallel_size: int = Field(1, description="GPUs one engine spans")
    gpu_memory_utilization: float = Field(0.2, description="share of GPU memory vLLM may take (≤ 0.3 on CPU)")
    quantization: str | None = Field(None, description="vLLM quantization method (awq, gptq, fp8, …)")
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype (auto, fp8, …)")
    enable_prefix_caching: bool = Field(True, description="reuse KV cache across rows sharing a prompt prefix")
    enforce_eager: bool | None = Field(
        None,
        description="skip CUDA graphs / torch.compile: faster start, slower decode "
        "(default: decided from the job's size)",
    )
    seed: int = Field(0, description="engine seed: sampled rows are reproducible across runs")
    chunk_size: int = Field(512, description="rows per chunk file: the most a kill can lose per shard in flight")
    model_mismatch: Literal["error", "ignore"] = Field(
        "error", description="a row whose body names another model: reject it (error) or run it anyway (ignore)"
    )

    def job(self) -> JobSpec:
        from nightshift.jobs import make_job

        return make_job(
            self.model,
            chunk_size=self.chunk_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            served_model_name=self.served_model_name,
            model_mismatch=self.model_mismatch,
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
        )
