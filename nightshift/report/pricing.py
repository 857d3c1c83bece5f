"""What hardware costs: the catalog of accelerator prices ($ per accelerator-hour, examples of
public list prices, not quotes), how an NVML device name finds its entry, and the `Rate` a run
is priced at. The Prefect blocks that users edit (nightshift.blocks.pricing) are built on these;
the report reads any `RateSource` and `ManagedPrices`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CPU_MACHINE = "cpu-2vcpu"
# $ per accelerator-hour, on demand and spot: examples of public cloud list prices (2026), not quotes.
ACCELERATOR_PRICES: dict[str, dict[str, float]] = {
    "B200": {"on_demand": 6.00, "spot": 3.00},
    "H200": {"on_demand": 3.80, "spot": 1.90},
    "H100": {"on_demand": 3.00, "spot": 1.50},
    "A100-80GB": {"on_demand": 1.90, "spot": 0.95},
    "A100": {"on_demand": 1.40, "spot": 0.70},  # the 40 GB card
    "L40S": {"on_demand": 1.10, "spot": 0.55},
    "A10G": {"on_demand": 1.00, "spot": 0.40},
    "L4": {"on_demand": 0.70, "spot": 0.28},
    "T4": {"on_demand": 0.35, "spot": 0.12},
    CPU_MACHINE: {"on_demand": 0.10, "spot": 0.03},
}


@dataclass(frozen=True)
class Rate:
    """What one run's hardware costs: per accelerator-hour, times `count`; None: unpriced."""

    accelerator: str
    count: int
    on_demand: float | None
    spot: float | None

    @property
    def priced(self) -> bool:
        return self.on_demand is not None


def catalog_entry(gpu_name: str, catalog: dict[str, dict[str, float]]) -> str | None:
    """The catalog's key for an NVML device name ("NVIDIA H100 80GB HBM3" → "H100"): every
    dash-separated part of the key in the name; the most specific key first (L40S before L4)."""
    name = gpu_name.upper().replace("NVIDIA", " ").replace("TESLA", " ")
    words = set(name.replace("-", " ").split())
    for key in sorted(catalog, key=len, reverse=True):
        parts = key.upper().split("-")
        if parts[0] in words and all(part in name for part in parts[1:]):
            return key
    return None


class RateSource(Protocol):
    """What prices a run: the rate of the hardware it used (`gpu_name` as NVML names it; None: no GPU)."""

    def rate(self, gpu_name: str | None, gpu_count: int = 0) -> Rate: ...


class ManagedPrices(Protocol):
    """Managed batch APIs' list prices, $ per 1M tokens: name → {input, output}; embedding name → price."""

    prices: dict[str, dict[str, float]]
    embedding_prices: dict[str, float]
