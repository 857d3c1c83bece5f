"""Typed Prefect blocks: the configuration a deployment names instead of repeating.

Register them with `prefect block register -m nightshift.blocks`; flows take their names as parameters
(`model`, `storage`, `pricing`).
"""

from nightshift.blocks.checkpoints import RunCheckpoints
from nightshift.blocks.model import ModelConfig
from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
from nightshift.blocks.storage import ObjectStorage

__all__ = ["GpuPricing", "ManagedApiPrices", "ModelConfig", "ObjectStorage", "RunCheckpoints"]
