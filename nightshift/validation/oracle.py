"""The oracle of the canary stage: the run's own tokens scored teacher-forced by Hugging Face
transformers on the reference weights. Torch and transformers only — no engine, no Prefect — so
it runs wherever the reference fits: the run's process, a GPU worker, or a bare GPU host
(`scripts/gpu_oracle_check.py`)."""

from __future__ import annotations


def oracle_check(
    samples: list[dict], reference: str, k: int, top_k: int, tolerance: float, adapters: dict[str, str] | None = None
) -> list[dict]:
    """Teacher-forced: the run's own first `k` tokens of each sample, scored in one forward pass
    of transformers on the reference weights. Each token must be among the reference's `top_k`
    at its position and within `tolerance` nats of its best. A near-tie decided the other way by
    bf16 or batch-dependent kernels passes; a token the reference would not consider fails.
    A sample of a LoRA adapter (its "adapter") is scored on the reference with that adapter's
    directory (`adapters[name]`) merged in by PEFT: what the adapter's weights mean, computed
    apart from vLLM's LoRA kernels."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    device, dtype = reference_placement(reference)
    results = []
    for adapter, model in _references(reference, device, dtype, samples, adapters or {}):
        for sample in (s for s in samples if s.get("adapter") == adapter):
            results.append(_score(sample, model, tokenizer, device, dtype, k, top_k, tolerance))
    order = {sample["custom_id"]: index for index, sample in enumerate(samples)}
    return sorted(results, key=lambda result: order[result["custom_id"]])


def reference_class(reference: str):
    """The transformers class that scores text on `reference`: a causal LM's, or a vision-language
    model's (its language model reads a text-only prompt alike); None for any other model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(reference).model_type
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else None


def _references(reference: str, device, dtype, samples: list[dict], adapters: dict[str, str]):
    """(adapter, model) for the base model and each adapter the samples name, one in memory at a time."""
    model_class = reference_class(reference)
    for adapter in sorted({s.get("adapter") for s in samples}, key=lambda name: name or ""):
        # straight onto the GPU (no copy through host memory) when it runs there
        placed = {"device_map": device} if device == "cuda" else {}
        model = model_class.from_pretrained(reference, dtype=dtype, **placed)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapters[adapter]).merge_and_unload()
        yield adapter, model.to(device).eval()
        del model


def _score(sample: dict, model, tokenizer, device, dtype, k: int, top_k: int, tolerance: float) -> dict:
    """One sample's verdict: its first `k` tokens teacher-forced through `model`."""
    import torch

    body = sample["body"]
    if "messages" in body:
        prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)  # as vLLM counts a chat prompt
    else:  # a completion: the prompt as given, with the special tokens vLLM's completions add
        prompt_ids = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    ours = sample["text"] or ""
    run_ids = list(sample.get("token_ids") or _retokenized(tokenizer, ours, k))[:k]
    if ours and not run_ids:  # not even one token of it re-tokenizes as the engine made it
        return _unscorable(sample, device, dtype)
    run_ids = run_ids or [tokenizer.eos_token_id]  # an empty answer: the end of sequence, which the reference expects
    ids = torch.tensor([prompt_ids + run_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(run_ids)].float()
    temperature = body.get("temperature") or 0
    logprobs = torch.log_softmax(logits / (temperature or 1), dim=-1).cpu()
    verdicts = score_tokens(logprobs, run_ids, top_k, tolerance)
    worst = max(verdicts, key=lambda v: (v["rank"], v["gap"]))
    excess = excess_surprisal(logprobs, run_ids) if temperature else None
    return {
        "custom_id": sample["custom_id"],
        "agrees": all(v["accepted"] for v in verdicts) if excess is None else excess <= tolerance,
        "tokens": len(run_ids),
        "worst_rank": worst["rank"],
        "worst_gap": round(worst["gap"], 4),
        "scored_as": "greedy" if excess is None else f"sampled at temperature {temperature}",
        "excess_surprisal": None if excess is None else round(excess, 4),
        "reference_on": f"{device} {str(dtype).removeprefix('torch.')}",
        "ours": ours[:80],
        "adapter": sample.get("adapter"),
    }


def _retokenized(tokenizer, text: str, k: int) -> list[int]:
    """The first of `k` tokens of `text` that are surely the engine's own: tokenized again, up to
    the first token that does not decode to the text's next characters (a character split across
    tokens: re-tokenizing joins it, and every later token is shifted — scored, they would look
    like another model's)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:k]
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end])
        if "\ufffd" in decoded or not text.startswith(decoded):
            return ids[: end - 1]
    return ids


def _unscorable(sample: dict, device, dtype) -> dict:
    return {
        "custom_id": sample["custom_id"],
        "agrees": True,
        "tokens": 0,
        "worst_rank": 0,
        "worst_gap": 0.0,
        "scored_as": "not scored: its first token splits a character (its tokens are not recoverable from its text)",
        "reference_on": f"{device} {str(dtype).removeprefix('torch.')}",
        "ours": (sample["text"] or "")[:80],
        "adapter": sample.get("adapter"),
    }


def excess_surprisal(logprobs, token_ids: list[int]) -> float:
    """How much more surprising the run's sampled tokens are to the reference than its own samples
    would be, on average, in nats per token: surprisal (−log p of the token) less the entropy of
    the reference's distribution at that temperature. Sampling from the reference itself averages
    0 (top_p / top_k keep the head: below 0); another model's tokens, or garbage, score far above.
    A sampled token may be any of the vocabulary, so no per-token rank can judge it."""
    import torch

    positions = torch.arange(len(token_ids))
    surprisal = -logprobs[positions, torch.tensor(token_ids)]
    entropy = -(logprobs.exp() * logprobs).nan_to_num().sum(dim=-1)
    return float((surprisal - entropy).mean())


def score_tokens(logprobs, token_ids: list[int], top_k: int, tolerance: float) -> list[dict]:
    """Per position: the run's token's rank in the reference's distribution (0: its best), its
    distance in nats from the best, and whether it is accepted (rank < top_k, gap ≤ tolerance)."""
    verdicts = []
    for position, token in enumerate(token_ids):
        row = logprobs[position]
        mine = row[token]
        rank = int((row > mine).sum())
        gap = float(row.max() - mine)
        verdicts.append({"rank": rank, "gap": gap, "accepted": rank < top_k and gap <= tolerance})
    return verdicts


def reference_placement(reference: str):
    """Where and in what precision the reference runs: on the GPU when there is one (the
    validating process is on a GPU worker), in float32 wherever its weights fit in float32 —
    a bf16 reference adds its own rounding to the run's, and on an H100 ranked a correct
    float32 run's tokens as low as 5th, 2.5 nats from its best (scripts/gpu_oracle_check.py) —
    else in bf16."""
    import torch

    from nightshift.models import weight_bytes

    if not torch.cuda.is_available():
        return "cpu", torch.float32
    stored = weight_bytes(reference)
    free, _ = torch.cuda.mem_get_info()
    # weights are stored in 16 bits at most times: float32 doubles them; keep a fifth for activations
    return "cuda", torch.float32 if 2 * stored <= 0.8 * free else torch.bfloat16
