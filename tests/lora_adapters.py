"""Small LoRA adapters on the tiny model, built by PEFT for the tests, and the greedy answers a
model merged with one gives (transformers, apart from vLLM)."""

from __future__ import annotations

from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a vision-language model's: its language model's layers only (vLLM adapts those, not the vision tower)
TEXT_MODEL_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _model_class(base: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = AutoConfig.from_pretrained(base).model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return (AutoModelForCausalLM, TARGETS) if causal else (AutoModelForImageTextToText, TEXT_MODEL_TARGETS)


def build_adapter(base: Path, target: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter of `rank` whose random weights are large enough to change every
    greedy answer of the tiny model (PEFT's own initialisation starts B at zero: no change)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model_class, targets = _model_class(base)
    model = model_class.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    adapted = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    adapted.save_pretrained(target)
    return target


def greedy_texts(base: Path, adapter: Path | None, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    """Each conversation's greedy answer by transformers on `base`, with `adapter` merged in."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = _model_class(base)[0].from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    texts = []
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return texts


def comparable(text: str) -> str:
    """A text as both detokenizers write it: vLLM's holds back the bytes of a character the
    answer ends in the middle of, transformers' writes them as U+FFFD."""
    return text.rstrip("\ufffd")
