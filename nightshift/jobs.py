"""Build a JobSpec from what a user names: a model and a few engine settings."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from nightshift.models import KNOWN_MODELS, resolve_model
from nightshift.records import ConfigurationError, EngineConfig, JobSpec

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_identity(model_path: str) -> str:
    """Path, size and mtime of every weight file: cheap, and changes when the weights do."""
    path = Path(model_path)
    if not path.is_dir():
        return f"name:{model_path}"  # a hub-style name: the engine resolves it
    parts = []
    for weight in sorted(path.rglob("*")):
        if weight.suffix in _WEIGHT_SUFFIXES or weight.name == "config.json":
            stat = weight.stat()
            parts.append(f"{weight.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256(f"{path.resolve()}|{'|'.join(parts)}".encode()).hexdigest()


def make_job(
    model: str = "smollm2",
    *,
    chunk_size: int = 512,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    served_model_name: str | None = None,
    model_mismatch: str = "error",
    result_cache: str | None = None,
    **engine_overrides,
) -> JobSpec:
    path = resolve_model(model)
    if served_model_name is None:
        served_model_name = model if model in KNOWN_MODELS else os.path.basename(path.rstrip("/"))
    if model_mismatch not in ("error", "ignore"):
        raise ValueError("model_mismatch must be 'error' or 'ignore'")
    engine = EngineConfig(model=path, max_model_len=max_model_len, max_num_seqs=max_num_seqs, **engine_overrides)
    return JobSpec(
        engine=engine,
        served_model_name=served_model_name,
        model_identity=model_identity(path),
        chunk_size=chunk_size,
        model_mismatch=model_mismatch,
        result_cache=str(Path(result_cache).resolve()) if result_cache and "://" not in result_cache else result_cache,
    )


def size_for_input(job: JobSpec, input_path: str, corpus=None, storage_options: dict | None = None) -> JobSpec:
    """The job with what depends on the input's size decided (compile or not), from an
    estimate read in milliseconds, so that the engine can start loading before planning."""
    from nightshift.engine import choose_enforce_eager
    from nightshift.inputs import detect_kind, estimate_rows

    rows = estimate_rows(input_path, detect_kind(input_path, corpus), storage_options)
    return replace(job, engine=choose_enforce_eager(job.engine, rows))


def check_job(job: JobSpec) -> JobSpec:
    """Check the engine settings against the model with vLLM's own model config, before any
    row is planned or any weight loaded (about a second); raise ConfigurationError in one line."""
    from pydantic import ValidationError
    from vllm.engine.arg_utils import EngineArgs

    engine = job.engine
    model = engine.model
    if (model.startswith((".", "/", "~")) or os.sep in model) and not Path(model).expanduser().is_dir():
        raise ConfigurationError(f"model directory {model!r} does not exist")
    try:
        EngineArgs(
            model=model,
            dtype=engine.dtype,
            max_model_len=engine.max_model_len or -1,
            quantization=engine.quantization,
            seed=engine.seed,
        ).create_model_config()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(("literal", "is-instance")))
        message = str(first.get("msg", exc)).removeprefix("Value error, ").split(". To allow")[0]
        raise ConfigurationError(f"{field + ': ' if field else ''}{message}") from None
    except (ValueError, OSError, RuntimeError) as exc:
        raise ConfigurationError(f"model {model!r}: {str(exc).splitlines()[0]}") from None
    return job
