"""Build a JobSpec from what a user names: a model and a few engine settings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import ValidationError

from nightshift.config import EngineConfig, EngineSettings, JobOptions, JobSpec
from nightshift.errors import ConfigurationError
from nightshift.models import DEFAULT_MODEL, KNOWN_MODELS, WEIGHT_SUFFIXES, remote_model_identity, resolve_model
from nightshift.runtime.storage import is_url


def model_identity(model_path: str) -> str:
    """Path, size and mtime of every weight file: cheap, and changes when the weights do. For an
    object-store URL: key, size and ETag of each (the same on every worker)."""
    if is_url(model_path):
        return remote_model_identity(model_path)
    path = Path(model_path)
    if not path.is_dir():
        return f"name:{model_path}"  # a hub-style name: the engine resolves it
    parts = []
    for weight in sorted(path.rglob("*")):
        if weight.suffix in WEIGHT_SUFFIXES or weight.name == "config.json":
            stat = weight.stat()
            parts.append(f"{weight.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256(f"{path.resolve()}|{'|'.join(parts)}".encode()).hexdigest()


def make_job(model: str = DEFAULT_MODEL, **settings) -> JobSpec:
    """A JobSpec for `model` (a bundled name or a directory) with any EngineSettings and JobOptions
    fields given by name; those left out, or given as None, take the configuration's defaults."""
    given = {name: value for name, value in settings.items() if value is not None}
    unknown = set(given) - set(EngineSettings.model_fields) - set(JobOptions.model_fields)
    if unknown:
        raise ConfigurationError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    path = resolve_model(model)
    options = {name: value for name, value in given.items() if name in JobOptions.model_fields}
    options.setdefault("served_model_name", model if model in KNOWN_MODELS else os.path.basename(path.rstrip("/")))
    cache = options.get("result_cache")
    if cache and not is_url(cache):
        options["result_cache"] = str(Path(cache).resolve())  # workers elsewhere read the same absolute path
    try:
        engine = EngineConfig(model=path, **{n: v for n, v in given.items() if n in EngineSettings.model_fields})
        job = JobSpec(engine=engine, model_identity=model_identity(path), **options)
    except ValidationError as exc:
        raise ConfigurationError(validation_message(exc)) from None
    return with_adapter_identities(with_engine_media_closed(job))


# vLLM's own media settings for a job of a tenant's rows: its in-process engine reads no local
# file (vLLM's default, said again) and fetches from no domain — this reserved name resolves
# nowhere. Nightshift reads what the policy allows itself and hands the engine data: URLs alone.
ENGINE_MEDIA_CLOSED = {"allowed_local_media_path": "", "allowed_media_domains": ["nightshift.invalid"]}


def with_engine_media_closed(job: JobSpec) -> JobSpec:
    """A job of a tenant's rows (media_sources="allowed") with vLLM's media settings closed."""
    if job.media_sources != "allowed":
        return job
    engine = job.engine.with_engine_args(job.engine.engine_arg_values | ENGINE_MEDIA_CLOSED)
    return job.model_copy(update={"engine": engine})


def with_adapter_identities(job: JobSpec) -> JobSpec:
    """The job with each LoRA adapter's identity taken now (its files hashed: an adapter is small),
    so that every shard, checkpoint and cached row of the job is of these weights."""
    from nightshift.engine.lora import adapter_identity

    adapters = job.engine.lora
    clash = job.adapter_names() & {job.served_model_name, job.engine.model}
    if clash:
        raise ConfigurationError(f"LoRA adapter named {sorted(clash)[0]!r} like the base model: give it its own name")
    known = []
    for adapter in adapters:
        if not is_url(adapter.path):  # workers elsewhere read the same absolute path
            adapter = adapter.model_copy(update={"path": str(Path(adapter.path).expanduser().resolve())})
        known.append(adapter.model_copy(update={"identity": adapter_identity(adapter)}))
    return job.model_copy(update={"engine": job.engine.model_copy(update={"lora": tuple(known)})})


def validation_message(exc: ValidationError) -> str:
    """The first problem pydantic (or vLLM's pydantic configs) found, in one line."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(("literal", "is-instance")))
    message = str(first.get("msg", exc)).removeprefix("Value error, ").split(". To allow")[0]
    return f"{field + ': ' if field else ''}{message}"


def size_for_input(job: JobSpec, input_path: str, corpus=None, storage_options: dict | None = None) -> JobSpec:
    """The job with what depends on the input's size decided (compile or not), from an
    estimate read in milliseconds, so that the engine can start loading before planning."""
    from nightshift.engine.sizing import choose_enforce_eager
    from nightshift.inputs import detect_kind, estimate_rows

    rows = estimate_rows(input_path, detect_kind(input_path, corpus), storage_options)
    return job.model_copy(update={"engine": choose_enforce_eager(job.engine, rows)})


def check_model_files(model: str) -> None:
    """A local model directory that cannot load (nightshift.models.model_files_problem), said in
    one line as a ConfigurationError; an object-store URL or a hub-style name passes as it is."""
    from nightshift.models import model_files_problem

    path = Path(model).expanduser()
    if path.is_dir() and (problem := model_files_problem(path)):
        raise ConfigurationError(f"model {model!r} cannot load: {problem}")


def check_job(job: JobSpec) -> JobSpec:
    """Check the model's files (whole, parseable, a tokenizer beside the weights) and the engine
    settings against the model with vLLM's own model config, before any row is planned or any
    weight loaded (about a second); raise ConfigurationError in one line."""
    from nightshift.engine.sizing import with_platform_defaults
    from nightshift.engine.vllm_adapter import engine_argument_names, model_config_of
    from nightshift.models import local_model

    engine = job.engine
    model = local_model(engine.model, job.model_identity)
    if (model.startswith((".", "/", "~")) or os.sep in model) and not Path(model).expanduser().is_dir():
        raise ConfigurationError(f"model directory {model!r} does not exist")
    check_model_files(model)
    local_adapters = [adapter.path for adapter in engine.lora if not is_url(adapter.path)]
    if local_adapters:  # a rank vLLM cannot serve is said now, not at engine start
        from nightshift.engine.lora import engine_lora_rank

        engine_lora_rank(local_adapters)
    unknown = set(engine.engine_arg_values) - engine_argument_names()
    if unknown:
        raise ConfigurationError(f"engine_args: vLLM's EngineArgs has no {', '.join(sorted(unknown))}")
    try:
        model_config_of(
            model=model,
            dtype=with_platform_defaults(engine).dtype,  # the platform's when left open
            max_model_len=engine.max_model_len or -1,
            quantization=engine.quantization,
            seed=engine.seed,
        )
    except ValidationError as exc:
        raise ConfigurationError(validation_message(exc)) from None
    except (ValueError, OSError, RuntimeError) as exc:
        raise ConfigurationError(f"model {model!r}: {str(exc).splitlines()[0]}") from None
    return job
