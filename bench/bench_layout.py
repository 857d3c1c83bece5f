"""The prefix-cache layout against vLLM's own `run_batch`: documents × questions, shuffled.

    .venv/bin/python bench/bench_layout.py                          # 30 documents × 10 questions, SmolLM2
    .venv/bin/python bench/bench_layout.py --documents 10 --questions 5 --kv-bytes 100000000
    .venv/bin/python bench/bench_layout.py --shard-size 60          # shards regrouped vs input slices
    .venv/bin/python bench/bench_layout.py --control-only --control-rows 10000 --model tiny --document-words 60

One OpenAI batch file: every row one document (≈ 600 tokens) and one question about it, 8
output tokens, the rows shuffled as an export would leave them. The same file goes through
`run_batch` in input order and sorted by document (the layout done by hand), and through
`nightshift run` with `--keep-order` and with its default layout, each a fresh process from
start to exit, with the same model, KV-cache budget and CPU cores (run_batch is given every
core through VLLM_CPU_OMP_THREADS_BIND, as Nightshift binds them for one engine). A control
file of unique prompts shows what the layout costs where there is nothing to share.

Printed: wall seconds and the ratio to run_batch on the shuffled file; Nightshift's prefix-cache
hit rate as `nightshift plan` predicts it and as its report measures it.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
PYTHON = sys.executable
NIGHTSHIFT = str(Path(sys.executable).with_name("nightshift"))

WORDS = (
    "invoice client quarter payment overdue contract supplier delivery warehouse audit budget "
    "revenue margin forecast shipment order balance credit account ledger tax refund customs "
    "freight insurance claim policy renewal premium schedule approval signature clause penalty"
).split()


def document(index: int, tokens_about: int) -> str:
    pick = random.Random(index)
    return " ".join(pick.choice(WORDS) for _ in range(tokens_about))


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w") as out:
        for i, (doc, question) in enumerate(rows):
            body = {
                "messages": [
                    {"role": "system", "content": "Answer in one short sentence from the document."},
                    {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {question}"},
                ],
                "max_tokens": 8,
                "temperature": 0,
            }
            out.write(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")  # fmt: skip


def run_batch(model: str, input_path: Path, work: Path, kv_bytes: int) -> dict:
    from bench_whole_job import timed

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    args = [PYTHON, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(input_path), "-o", str(work / "rb.jsonl"),
            "--model", model, "--dtype", "float32", "--max-model-len", "2048", "--seed", "0",
            "--kv-cache-memory-bytes", str(kv_bytes)]  # fmt: skip
    return timed(args, env)


def nightshift(model: str, input_path: Path, work: Path, kv_bytes: int, *extra: str) -> dict:
    from bench_whole_job import timed

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"HF_HUB_OFFLINE": "1"}
    args = [NIGHTSHIFT, "run", str(input_path), "--output", str(run_dir), "--model", model,
            "--kv-cache-memory-bytes", str(kv_bytes), *extra]  # fmt: skip
    result = timed(args, env, ok_exits=(0, 3))
    result["hit_rate"] = json.loads((run_dir / "report.json").read_text()).get("prefix_cache_hit_rate")
    return result


def predicted(model: str, input_path: Path, kv_bytes: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [NIGHTSHIFT, "plan", str(input_path), "--model", model, "--kv-cache-memory-bytes", str(kv_bytes),
         "--format", "json"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    tokens = json.loads(done.stdout)["tokens"]
    return {k: tokens[k] for k in ("prefix_cache_hit_rate_predicted", "prefix_cache_hit_rate_input_order")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--documents", type=int, default=30)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--document-words", type=int, default=450, help="≈ 600 tokens with SmolLM2's tokenizer")
    parser.add_argument("--kv-bytes", type=int, default=200_000_000)
    parser.add_argument("--control-rows", type=int, default=100, help="rows of the unique-prompt control (0: none)")
    parser.add_argument("--control-only", action="store_true", help="only the unique-prompt control")
    parser.add_argument(
        "--shard-size", type=int, help="also run Nightshift in shards of this size, regrouped and as input slices"
    )
    args = parser.parse_args()

    from nightshift.models import provision

    model = str(provision((args.model,))[args.model])
    work = Path(tempfile.mkdtemp(prefix="nightshift-layout-"))
    rows = [(document(d, args.document_words), f"What does point {q} say?") for d in range(args.documents)
            for q in range(args.questions)]  # fmt: skip
    shuffled, grouped = list(rows), list(rows)
    random.Random(0).shuffle(shuffled)
    write_rows(work / "shuffled.jsonl", shuffled)
    write_rows(work / "sorted.jsonl", grouped)
    results = {}
    if not args.control_only:
        prediction = predicted(model, work / "shuffled.jsonl", args.kv_bytes)
        print(f"{len(rows)} rows; predicted hit rate {prediction}", flush=True)
        results = {
            "run_batch, shuffled": run_batch(model, work / "shuffled.jsonl", work, args.kv_bytes),
            "run_batch, sorted by hand": run_batch(model, work / "sorted.jsonl", work, args.kv_bytes),
            "nightshift --keep-order, shuffled": nightshift(
                model, work / "shuffled.jsonl", work, args.kv_bytes, "--keep-order"
            ),  # fmt: skip
            "nightshift (layout), shuffled": nightshift(model, work / "shuffled.jsonl", work, args.kv_bytes),
        }
    if args.shard_size and not args.control_only:
        size = ("--shard-size", str(args.shard_size))
        results[f"nightshift (layout), shuffled, shards of {args.shard_size} regrouped by prefix"] = nightshift(
            model, work / "shuffled.jsonl", work, args.kv_bytes, *size
        )
        results[f"nightshift (layout), shuffled, shards of {args.shard_size} as input slices"] = nightshift(
            model, work / "shuffled.jsonl", work, args.kv_bytes, *size, "--shard-slices"
        )
    if args.control_rows:
        unique = [(document(10_000 + i, args.document_words), "What does it say?") for i in range(args.control_rows)]
        write_rows(work / "unique.jsonl", unique)
        results["control: run_batch, unique prompts"] = run_batch(model, work / "unique.jsonl", work, args.kv_bytes)
        results["control: nightshift (layout), unique prompts"] = nightshift(
            model, work / "unique.jsonl", work, args.kv_bytes
        )
    baseline = results.get("run_batch, shuffled", {}).get("wall")
    control = results.get("control: run_batch, unique prompts", {}).get("wall")
    print("\n| run | wall | × run_batch (same file) | prefix-cache hit rate (measured) |")
    print("|---|---|---|---|")
    for name, result in results.items():
        base = control if name.startswith("control") else baseline
        rate = result.get("hit_rate")
        print(f"| {name} | {result['wall']:.1f} s | {result['wall'] / base:.2f}× | "
              f"{'—' if rate is None else f'{100 * rate:.1f} %'} |")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
