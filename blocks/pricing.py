"""Prices the cost report uses. Edit them in the Prefect UI (or in code) to match your cloud.

By default (`accelerator="auto"`) a run is priced as the hardware it ran on: the card NVML named
(its entry in `catalog`, per accelerator-hour, times the cards the engine held), the CPU machine
when no GPU was there, and "unpriced" — no figure at all — for a card the catalog does not know.
Naming an accelerator and its prices prices every run so. The catalog's figures and the managed
batch APIs' are examples of public list prices, not quotes: set your own.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from nightshift.report.pricing import ACCELERATOR_PRICES, CPU_MACHINE, Rate, catalog_entry

__all__ = ["ACCELERATOR_PRICES", "CPU_MACHINE", "GpuPricing", "ManagedApiPrices", "Rate", "catalog_entry"]


class GpuPricing(Block):
    """What the engine's accelerators cost per hour: the card NVML names, from the catalog, by default."""

    _block_type_name = "Nightshift GPU Pricing"
    _block_type_slug = "nightshift-gpu-pricing"

    accelerator: str = Field(
        "auto", description="auto: the card NVML names (the CPU machine when none); else a name priced as given"
    )
    accelerators: int | None = Field(None, description="accelerators billed while the engine runs (default: NVML's)")
    on_demand_per_hour: float | None = Field(None, description="$ per accelerator-hour on demand (default: catalog)")
    spot_per_hour: float | None = Field(None, description="$ per accelerator-hour, spot (default: catalog)")
    catalog: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in ACCELERATOR_PRICES.items()},
        description="accelerator → {on_demand, spot} $ per hour; NVML names match a key by its parts",
    )

    def rate(self, gpu_name: str | None, gpu_count: int = 0) -> Rate:
        """The price of the hardware a run used (`gpu_name` as NVML names it; None: no GPU)."""
        if self.accelerator != "auto":
            name = self.accelerator
        elif gpu_name:
            name = catalog_entry(gpu_name, self.catalog) or gpu_name
        else:
            name = CPU_MACHINE
        listed = self.catalog.get(name, {})
        on_demand = self.on_demand_per_hour if self.on_demand_per_hour is not None else listed.get("on_demand")
        spot = self.spot_per_hour if self.spot_per_hour is not None else listed.get("spot", on_demand)
        count = self.accelerators or (gpu_count if gpu_name and self.accelerator == "auto" else 1) or 1
        label = name if on_demand is not None else f"{name} (unpriced)"
        return Rate(label, count, on_demand, spot if on_demand is not None else None)


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
