"""Typed Prefect blocks: the configuration a deployment names instead of repeating.

Register them with `prefect block register -m blocks`.
"""

from blocks.pricing import GpuPricing, ManagedApiPrices

__all__ = ["GpuPricing", "ManagedApiPrices"]
