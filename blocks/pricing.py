"""Prices the cost report uses. Edit them in the Prefect UI (or in code) to match your cloud.

The defaults price the machine this runs on here (a 2-vCPU CPU instance) and list a few
managed batch APIs for comparison. They are examples, not quotes: set your own.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field


class GpuPricing(Block):
    """What one accelerator of the engine's machine costs per hour."""

    _block_type_name = "Nightshift GPU Pricing"
    _block_type_slug = "nightshift-gpu-pricing"

    accelerator: str = Field("cpu-2vcpu", description="GPU type (or 'cpu-…' for a CPU machine)")
    accelerators: int = Field(1, description="accelerators billed while the engine runs")
    on_demand_per_hour: float = Field(0.10, description="$ per accelerator-hour, on demand")
    spot_per_hour: float = Field(0.03, description="$ per accelerator-hour, spot / preemptible")


class ManagedApiPrices(Block):
    """List prices of managed batch APIs in $ per 1M tokens, to say what the job would cost there."""

    _block_type_name = "Nightshift Managed API Prices"
    _block_type_slug = "nightshift-managed-api-prices"

    prices: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "openai-batch-gpt-4o-mini": {"input": 0.075, "output": 0.30},
            "openai-batch-gpt-4.1-nano": {"input": 0.05, "output": 0.20},
        },
        description="name → {input, output} in $ per 1M tokens",
    )
    embedding_prices: dict[str, float] = Field(
        default_factory=lambda: {
            "openai-batch-text-embedding-3-small": 0.01,
            "openai-batch-text-embedding-3-large": 0.065,
        },
        description="embedding APIs: name → $ per 1M input tokens (compared when a run embeds)",
    )
