"""The canary oracle and the GPU sampler on a real GPU — a documented check for a host with an
NVIDIA GPU, torch, transformers and nvidia-ml-py (no vLLM, no Prefect needed):

    python scripts/gpu_oracle_check.py --model .cache/models/tiny --out /tmp/gpu-check

1. The run's tokens: greedy in float32 on the CPU, as a float32 engine produces them.
2. The old gate: greedy again in bf16 on the GPU, free-running; how many samples agree exactly
   on their first tokens (one near-tie flipped by bf16 changes every later token).
3. The gate now: `nightshift.validation.oracle.oracle_check` — the run's tokens scored teacher-forced on
   the GPU (float32 where the reference fits, as it does here); every sample of the float32 run
   and of a bf16 GPU run (step 2's tokens) must be accepted.
4. A tampered reference (the weights plus noise): the same tokens must be rejected.
5. `nightshift.observe.telemetry.GpuSampler` while batched bf16 generation runs: its samples and the
   tokens finished per second go to OUT/gpu_run.json; `render_chart` draws them on the CPU side
   (docs/report.md).

Prints one JSON verdict; exits 1 when a correct reference is not accepted or a tampered one is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [f"Write one sentence about topic {i}: {word}." for i, word in enumerate(
    "invoices harbours glaciers compilers orchards lighthouses tariffs violins "
    "satellites bakeries monsoons ledgers bridges beehives telescopes pottery".split()
)]  # fmt: skip


def greedy(model, tokenizer, prompts: list[str], tokens: int, device: str) -> list[list[int]]:
    import torch

    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device)
        with torch.no_grad():
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def tampered_copy(model_dir: Path, into: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    target = into / "tampered"
    shutil.copytree(model_dir, target)
    weights = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    noisy = {n: w + 0.5 * torch.randn(w.shape, generator=generator) if w.dim() == 2 else w for n, w in weights.items()}
    save_file(noisy, target / "model.safetensors", metadata={"format": "pt"})
    return target


def sampled_generation(model, tokenizer, seconds: float, device: str) -> dict:
    """Batched bf16 greedy generation on the GPU for `seconds`, sampled by GpuSampler."""
    import torch

    from nightshift.observe.telemetry import GpuSampler

    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in PROMPTS * 16], add_generation_prompt=True,
        return_tensors="pt", return_dict=True, padding=True,
    )  # fmt: skip
    timeline: dict[int, int] = {}
    with GpuSampler(interval_s=0.5) as sampler:
        time.sleep(2)  # an idle stretch first: the line must show the GPU going busy
        stop = time.time() + seconds
        while time.time() < stop:
            with torch.no_grad():
                generated = model.generate(
                    batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), max_new_tokens=32,
                    min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
            second = int(time.time())
            timeline[second] = timeline.get(second, 0) + (generated.shape[1] - batch["input_ids"].shape[1]) * len(
                generated
            )
        time.sleep(2)
    return {
        "gpu_name": sampler.gpu_name,
        "gpu_count": sampler.gpu_count,
        "unavailable_reason": sampler.unavailable_reason,
        "gpu_samples": sampler.samples,
        "token_timeline": sorted(timeline.items()),
    }


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nightshift.validation.oracle import oracle_check

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a local model directory (safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    assert args.device == "cpu" or torch.cuda.is_available(), "this check needs a GPU"

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cpu = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    run_tokens = greedy(cpu, tokenizer, PROMPTS, args.tokens, "cpu")
    gpu = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device).eval()
    bf16_tokens = greedy(gpu, tokenizer, PROMPTS, args.tokens, args.device)
    exact = sum(a[:8] == b[:8] for a, b in zip(run_tokens, bf16_tokens))

    def samples_of(tokens: list[list[int]]) -> list[dict]:
        return [
            {"custom_id": f"p{i}", "body": {"messages": [{"role": "user", "content": p}]},
             "text": tokenizer.decode(ids), "token_ids": ids}
            for i, (p, ids) in enumerate(zip(PROMPTS, tokens))
        ]  # fmt: skip

    samples = samples_of(run_tokens)
    correct = oracle_check(samples, str(args.model), args.tokens, top_k=5, tolerance=2.0)
    correct_bf16_run = oracle_check(samples_of(bf16_tokens), str(args.model), args.tokens, top_k=5, tolerance=2.0)
    with tempfile.TemporaryDirectory() as scratch:
        tampered = str(tampered_copy(args.model, Path(scratch)))
        wrong = oracle_check(samples, tampered, args.tokens, top_k=5, tolerance=2.0)
    run = sampled_generation(gpu, tokenizer, seconds=8, device=args.device)
    (args.out / "gpu_run.json").write_text(json.dumps(run))

    verdict = {
        "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None,
        "samples": len(PROMPTS),
        "exact_greedy_agreement_bf16_vs_fp32_first_8": f"{exact}/{len(PROMPTS)}",
        "oracle_accepts_correct_reference": f"{sum(r['agrees'] for r in correct)}/{len(correct)}",
        "oracle_worst_rank_correct": max(r["worst_rank"] for r in correct),
        "oracle_worst_gap_correct": max(r["worst_gap"] for r in correct),
        "oracle_reference_on": correct[0]["reference_on"],
        "oracle_accepts_a_bf16_gpu_run": f"{sum(r['agrees'] for r in correct_bf16_run)}/{len(correct_bf16_run)}",
        "oracle_worst_rank_bf16_gpu_run": max(r["worst_rank"] for r in correct_bf16_run),
        "oracle_worst_gap_bf16_gpu_run": max(r["worst_gap"] for r in correct_bf16_run),
        "oracle_accepts_tampered_reference": f"{sum(r['agrees'] for r in wrong)}/{len(wrong)}",
        "oracle_worst_rank_tampered": max(r["worst_rank"] for r in wrong),
        "gpu_samples": len(run["gpu_samples"]),
        "gpu_util_max": max((s["util"] for s in run["gpu_samples"]), default=None),
        "tokens_per_s_peak": max((t for _, t in run["token_timeline"]), default=0),
    }
    print(json.dumps(verdict, indent=1))
    (args.out / "verdict.json").write_text(json.dumps(verdict, indent=1))
    ok = all(r["agrees"] for r in correct + correct_bf16_run) and not any(r["agrees"] for r in wrong)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
