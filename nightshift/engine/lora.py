"""LoRA adapters: a row whose `model` names one is generated with it (`--lora NAME=PATH`).

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`), local or on
an object store. Its identity is a hash of its files' contents (an object store's: key, size and
ETag), taken when the job is made: it enters the job's fingerprint, so shards, checkpoints and the
result cache of a run made with other weights are never reused, and an engine or an oracle that
finds other bytes under the path than the job was made with refuses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nightshift.config import LoraAdapter
from nightshift.errors import ConfigurationError
from nightshift.runtime.storage import is_url

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# vLLM's LoRA slots come in these ranks (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_identity(adapter: LoraAdapter) -> str:
    """The adapter's name and a hash of its files' contents (a bucket's: keys, sizes, ETags)."""
    if is_url(adapter.path):
        from nightshift.models import remote_model_identity

        return f"{adapter.name}:{remote_model_identity(adapter.path)}"
    directory = _checked_directory(adapter)
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(directory)}\0".encode())
        with file.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return f"{adapter.name}:{digest.hexdigest()}"


def local_adapter(adapter: LoraAdapter) -> str:
    """A local directory holding the adapter the job was made with (its `identity`): a bucket's
    fetched once per machine (nightshift.models.local_model); a local one checked against it."""
    from nightshift.models import local_model

    identity = adapter.identity or adapter_identity(adapter)
    if is_url(adapter.path):
        return local_model(adapter.path, identity.split(":", 1)[1])
    if adapter_identity(adapter) != identity:
        raise ConfigurationError(
            f"LoRA adapter {adapter.name!r} at {adapter.path} changed since this job was made; "
            "run the job again to use the new weights"
        )
    return adapter.path


def adapter_rank(directory: str) -> int:
    return int(_adapter_config(Path(directory)).get("r") or 8)


def base_model_of(directory: str) -> str | None:
    return _adapter_config(Path(directory)).get("base_model_name_or_path")


def engine_lora_rank(directories: list[str]) -> int:
    """The smallest rank vLLM offers that holds every adapter's."""
    wanted = max(adapter_rank(d) for d in directories)
    fitting = [rank for rank in VLLM_LORA_RANKS if rank >= wanted]
    if not fitting:
        raise ConfigurationError(f"a LoRA adapter of rank {wanted}: vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def _checked_directory(adapter: LoraAdapter) -> Path:
    directory = Path(adapter.path).expanduser()
    if not directory.is_dir():
        raise ConfigurationError(f"LoRA adapter {adapter.name!r}: {adapter.path} is not a directory")
    if not any((directory / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigurationError(
            f"LoRA adapter {adapter.name!r}: no {' or '.join(ADAPTER_WEIGHTS)} in {adapter.path} (a PEFT adapter's "
            "save_pretrained directory)"
        )
    _adapter_config(directory, adapter.name)
    return directory


def _adapter_config(directory: Path, name: str | None = None) -> dict:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"LoRA adapter {name or directory.name!r}: {path} is missing") from None
    except (ValueError, OSError) as exc:
        raise ConfigurationError(f"LoRA adapter {name or directory.name!r}: {path} does not parse: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigurationError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    return config
