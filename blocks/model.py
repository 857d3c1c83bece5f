"""The model a job runs: one block per model configuration, named by deployments.

Save one in the Prefect UI (Blocks → "Nightshift Model") or in code:

    ModelConfig(model="/models/llama-3.1-8b-instruct",
                engine=EngineSettings(dtype="bfloat16", max_model_len=8192)).save("llama-8b")

then run with `--param model=llama-8b`. `engine` and `options` are Nightshift's own typed
configuration (`nightshift.config`): the same fields, defaults and validation as the CLI's.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from nightshift.config import EngineSettings, JobOptions, JobSpec
from nightshift.models import DEFAULT_MODEL


class ModelConfig(Block):
    """A model and the engine settings to serve it with."""

    _block_type_name = "Nightshift Model"
    _block_type_slug = "nightshift-model"

    model: str = Field(DEFAULT_MODEL, description="bundled name (tiny, smollm2) or a model directory on the workers")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="how vLLM is built for this model")
    options: JobOptions = Field(default_factory=JobOptions, description="served name, chunk size, policies")

    def job(self) -> JobSpec:
        from nightshift.jobs import make_job

        return make_job(self.model, **self.engine.model_dump(), **self.options.model_dump())

    @classmethod
    def job_named(cls, name: str | None) -> JobSpec:
        """The job of the block saved as `name` (with or without its `nightshift-model/` type prefix)."""
        if not name:
            raise ValueError("give the flow a `job` or the name of a ModelConfig block as `model`")
        return cls.load(name.removeprefix("nightshift-model/")).job()
