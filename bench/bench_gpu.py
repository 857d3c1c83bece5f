"""Nightshift on a GPU against vLLM's `LLM.chat` and `run_batch`: the same rows, each with its defaults.

    python bench/bench_gpu.py                              # a random Llama-3.1-8B-shaped model, 1,500 rows
    python bench/bench_gpu.py --shape tiny --rows 40       # the script itself, on any machine (a CPU too)
    python bench/bench_gpu.py --variant graphs             # also: CUDA graphs without torch.compile

Runnable on any single-GPU machine with vLLM and the project importable (`../shared/gpu/` stages
both for the offline H200). It writes a random model of the named shape (bf16, N(0, 0.02) weights,
SmolLM2's tokenizer and vocabulary: throughput depends on shapes, not values), then runs the same
unique chat rows (about 318 prompt tokens, 256 completion tokens each: `ignore_eos`, greedy):

- `nightshift run` with no engine flag, as a fresh process (its temporary Prefect server,
  planning, validation and report included);
- vLLM's `LLM.chat` on the same messages, as a fresh process (engine start and generate timed);
- vLLM's `run_batch` on the same file, as a fresh process.

Printed: whole-process seconds, generate seconds (Nightshift's report, LLM.chat's call; run_batch
has none of its own), tokens/s and output tokens/s over the generate phase (run_batch: over the
whole process), the GPU's mean utilization (NVML, sampled here every 0.5 s over the process), and
$ per 1M output tokens at the card's catalog price over the whole process — then the ratios the
issue asks for. `--json FILE` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    # Llama-3.1-8B's, its vocabulary cut to SmolLM2's (its tokenizer ships with the model)
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1},  # head_dim 64: what vLLM's CPU attention takes
}  # fmt: skip
VOCAB = 49152
WORDS = (
    "river market signal harbor engine ledger orchard summit canvas lantern meadow copper velvet quarry "
    "beacon thunder pillar saddle marble willow falcon compass timber crystal garden shadow voyage anchor "
    "circuit mosaic prairie glacier bramble cinder harvest island jungle kettle lagoon mirror nectar "
    "oyster pepper quill rocket spindle tunnel umbrella valley wagon yarrow zephyr"
).split()
# CUDA graphs of whole decode steps, captured without torch.compile: most of the compiled decode, a short start
GRAPHS_WITHOUT_COMPILE = 'compilation_config={"mode":0,"cudagraph_mode":"FULL_DECODE_ONLY"}'
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "TOKENIZERS_PARALLELISM": "false",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip


def write_model(shape: str, out: Path, tokenizer_dir: Path) -> Path:
    """A random LlamaForCausalLM of `shape` in bf16 safetensors shards, written from the GPU if any."""
    import torch
    from safetensors.torch import save_file

    dims = SHAPES[shape]
    hidden, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    heads, kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = hidden // heads
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dims, "head_dim": head_dim,
              "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "rope_theta": 500000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16", "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 2}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(*size, ones=False):
        if ones:
            return torch.ones(size, dtype=torch.bfloat16, device=device)
        return (torch.randn(size, generator=generator, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    shard: dict = {"model.embed_tokens.weight": tensor(VOCAB, hidden)}
    index, number = {}, 0

    def flush():
        nonlocal shard, number
        name = f"model-{number:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, number = {}, number + 1

    for i in range(layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": tensor(hidden, hidden),
            p + "self_attn.k_proj.weight": tensor(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": tensor(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": tensor(hidden, hidden),
            p + "mlp.gate_proj.weight": tensor(inter, hidden), p + "mlp.up_proj.weight": tensor(inter, hidden),
            p + "mlp.down_proj.weight": tensor(hidden, inter), p + "input_layernorm.weight": tensor(hidden, ones=True),
            p + "post_attention_layernorm.weight": tensor(hidden, ones=True),
        })  # fmt: skip
        if i % 4 == 3:
            flush()
    shard.update({"model.norm.weight": tensor(hidden, ones=True), "lm_head.weight": tensor(VOCAB, hidden)})
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


def write_rows(path: Path, rows: int, max_tokens: int) -> list[list[dict]]:
    """Unique chat rows of about 318 prompt tokens; each generates exactly `max_tokens`."""
    rng = random.Random(7)
    conversations = []
    with open(path, "w") as out:
        for i in range(rows):
            text = f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(240))
            messages = [{"role": "user", "content": f"Summarize this document.\n\n{text}"}]
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            out.write(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")  # fmt: skip
            conversations.append(messages)
    return conversations


class GpuWatch:
    """NVML utilization sampled every 0.5 s while a process runs (None without a GPU)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
            self.name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        except Exception:  # noqa: BLE001 - no NVIDIA GPU here
            self._nvml, self.name = None, None

    def __enter__(self):
        if self._nvml is not None:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(0.5):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def timed(args: list[str], log: Path, timeout: float) -> tuple[float, float | None, int]:
    """(whole-process seconds, mean GPU utilization, exit status) of a fresh process."""
    with GpuWatch() as watch, open(log, "w") as out:
        started = time.perf_counter()
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                              cwd=log.parent, timeout=timeout).returncode  # fmt: skip
        wall = time.perf_counter() - started
    return round(wall, 2), watch.mean, code


def nightshift(model: Path, rows: Path, work: Path, name: str, extra: list[str], timeout: float) -> dict:
    run_dir = work / name
    wall, util, code = timed([sys.executable, "-m", "nightshift.cli", "run", str(rows), "--output", str(run_dir),
                              "--model", str(model), *extra], work / f"{name}.log", timeout)  # fmt: skip
    result = {"system": name, "whole_s": wall, "gpu_util": util, "exit": code}
    report_path = run_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        result.update({
            "generate_s": report.get("generate_seconds"), "tokens_s": report.get("tokens_per_second"),
            "output_tokens_s": report.get("output_tokens_per_second"), "output_tokens": report.get("completion_tokens"),
            "report_gpu_util": report.get("gpu_utilization_mean"), "accelerator": report.get("accelerator"),
            "report_usd_per_m_output": report.get("cost_per_million_output_tokens"),
            "validated": report.get("validation_state") or report.get("validated"),
            "validation_s": report.get("validation_seconds"),
            "validation_usd": report.get("validation_cost_on_demand"),
            "enforce_eager": (report.get("engine_settings") or {}).get("enforce_eager"),
            "dtype": (report.get("engine_settings") or {}).get("dtype"),
        })  # fmt: skip
    return result


LLM_CHAT = """
import json, sys, time


def main():
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1])
    t1 = time.perf_counter()
    conversations = json.load(open(sys.argv[2]))
    params = SamplingParams(max_tokens=int(sys.argv[3]), temperature=0, ignore_eos=True)
    outs = llm.chat(conversations, params, use_tqdm=False)
    t2 = time.perf_counter()
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    output = sum(len(o.outputs[0].token_ids) for o in outs)
    figures = {"start_s": t1 - t0, "generate_s": t2 - t1, "prompt_tokens": prompt, "output_tokens": output}
    print("RESULT " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
"""


def llm_chat(model: Path, conversations: list, work: Path, max_tokens: int, timeout: float) -> dict:
    (work / "conversations.json").write_text(json.dumps(conversations))
    (work / "llm_chat.py").write_text(LLM_CHAT)
    log = work / "llm_chat.log"
    wall, util, code = timed([sys.executable, str(work / "llm_chat.py"), str(model), str(work / "conversations.json"),
                              str(max_tokens)], log, timeout)  # fmt: skip
    result = {"system": "LLM.chat", "whole_s": wall, "gpu_util": util, "exit": code}
    said = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    if said:
        figures = json.loads(said[-1].removeprefix("RESULT "))
        generate = figures["generate_s"]
        result.update({
            "start_s": round(figures["start_s"], 2), "generate_s": round(generate, 2),
            "tokens_s": round((figures["prompt_tokens"] + figures["output_tokens"]) / generate, 1),
            "output_tokens_s": round(figures["output_tokens"] / generate, 1), "output_tokens": figures["output_tokens"],
        })  # fmt: skip
    return result


def run_batch(model: Path, rows: Path, work: Path, timeout: float) -> dict:
    output = work / "run_batch.jsonl"
    wall, util, code = timed([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(rows), "-o",
                              str(output), "--model", str(model)], work / "run_batch.log", timeout)  # fmt: skip
    result = {"system": "run_batch", "whole_s": wall, "gpu_util": util, "exit": code}
    if output.exists():
        lines = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
        usage = [(line.get("response") or {}).get("body", {}).get("usage") or {} for line in lines]
        prompt, out = sum(u.get("prompt_tokens", 0) for u in usage), sum(u.get("completion_tokens", 0) for u in usage)
        result.update({"answered": sum(1 for u in usage if u), "output_tokens": out,
                       "tokens_s_whole": round((prompt + out) / wall, 1)})  # fmt: skip
    return result


def priced(results: list[dict], price_per_hour: float | None) -> None:
    for result in results:
        if price_per_hour is not None and result.get("output_tokens"):
            per_output = result["whole_s"] / 3600 * price_per_hour / result["output_tokens"]
            result["usd_per_m_output_whole"] = round(per_output * 1e6, 4)


def table(results: list[dict]) -> str:
    columns = ["system", "whole_s", "generate_s", "tokens_s", "output_tokens_s", "gpu_util", "usd_per_m_output_whole",
               "exit"]  # fmt: skip
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(str(r.get(c, "")) for c in columns) for r in results]
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    by = {r["system"]: r for r in results}
    ours, llm, rb = by.get("nightshift"), by.get("LLM.chat"), by.get("run_batch")
    found = {}
    if ours and llm and ours.get("tokens_s") and llm.get("tokens_s"):
        found["nightshift / LLM.chat tokens/s (generate)"] = round(ours["tokens_s"] / llm["tokens_s"], 3)
    if ours and rb:
        found["nightshift / run_batch whole-process seconds"] = round(ours["whole_s"] / rb["whole_s"], 3)
    if ours and llm:
        found["nightshift / LLM.chat whole-process seconds"] = round(ours["whole_s"] / llm["whole_s"], 3)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", default=str(REPO / ".cache/models/smollm2"), help="SmolLM2's tokenizer files")
    parser.add_argument("--work", help="a directory for the model, rows and runs (default: a temporary one)")
    parser.add_argument("--systems", default="nightshift,LLM.chat,run_batch")
    parser.add_argument("--variant", action="append", default=[], choices=["graphs", "compiled", "eager"],
                        help="also nightshift with CUDA graphs but no torch.compile, compiled, or eager")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="seconds each process may take")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="nightshift-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = write_model(args.shape, work / f"model-{args.shape}", Path(args.tokenizer))
    print(f"model {args.shape} written in {time.perf_counter() - started:.0f} s", flush=True)
    conversations = write_rows(work / "rows.jsonl", args.rows, args.max_tokens)
    variants = {
        "graphs": ["--no-enforce-eager", "--engine-arg", GRAPHS_WITHOUT_COMPILE],
        "compiled": ["--no-enforce-eager"],
        "eager": ["--enforce-eager"],
    }  # fmt: skip
    quiet = ["--oracle-samples", "0", "--determinism-samples", "0"]  # the variants measure the engine alone
    results = []
    for system in args.systems.split(","):
        if system == "nightshift":
            results.append(nightshift(model, work / "rows.jsonl", work, "nightshift", [], args.timeout))
        elif system == "LLM.chat":
            results.append(llm_chat(model, conversations, work, args.max_tokens, args.timeout))
        elif system == "run_batch":
            results.append(run_batch(model, work / "rows.jsonl", work, args.timeout))
        print(json.dumps(results[-1]), flush=True)
    for variant in args.variant:
        results.append(nightshift(model, work / "rows.jsonl", work, f"nightshift-{variant}", variants[variant] + quiet,
                                  args.timeout))  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    from nightshift.blocks.pricing import GpuPricing

    watch = GpuWatch()
    rate = GpuPricing().rate(watch.name, 1 if watch.name else 0)
    priced(results, rate.on_demand)
    print(f"\n{args.rows} rows × {args.max_tokens} tokens, shape {args.shape}, on {watch.name or 'no GPU'} "
          f"(priced as {rate.accelerator}, ${rate.on_demand}/h)\n")  # fmt: skip
    print(table(results))
    found = ratios(results)
    for name, value in found.items():
        print(f"{name}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": found, "gpu": watch.name,
                                               "rate": rate.__dict__}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
