"""Typed Prefect blocks: the configuration a deployment names instead of repeating.

Register them with `prefect block register -m blocks`; flows take their names as parameters
(`model`, `storage`, `pricing`).
"""

from blocks.model import ModelConfig
from blocks.pricing import GpuPricing, ManagedApiPrices
from blocks.storage import ObjectStorage

__all__ = ["GpuPricing", "ManagedApiPrices", "ModelConfig", "ObjectStorage"]
