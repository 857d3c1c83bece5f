"""Throughput of the generate stage against raw `LLM.chat`, same engine, same requests, one run.

    .venv/bin/python bench/bench_generate.py [--model tiny|smollm2] [--requests 1000]

Both sides use one vLLM engine (the pipeline's own), so the ratio isolates what the stage
adds: shard and chunk boundaries, per-row validation, the driver thread, chunk files.
Raw `LLM.chat` gets every request at once — the best case for the engine. Requests have
mixed lengths (max_tokens drawn from 8..64) so a drain at a boundary would show.
Order: a warm-up, then `--rounds` rounds of (raw, pipeline), interleaved so that drift in
the machine's speed hits both sides; the ratio compares the summed throughputs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_requests(count: int, seed: int = 0) -> list[dict]:
    from nightshift.samples import sample_documents

    rng = random.Random(seed)
    requests = []
    for doc in sample_documents(count, seed=seed):
        body = {
            "messages": [{"role": "user", "content": f"Summarize in one sentence:\n\n{doc['text']}"}],
            "max_tokens": rng.randint(8, 64),
            "temperature": 0,
            "ignore_eos": True,  # lengths are the drawn ones, whatever the model
        }
        requests.append({"custom_id": doc["id"], "method": "POST", "url": "/v1/chat/completions", "body": body})
    return requests


def run_raw(engine, requests) -> tuple[float, int]:
    from vllm import SamplingParams

    conversations = [r["body"]["messages"] for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r["body"]["max_tokens"], ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = engine.llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_pipeline(job, batch_path: str, shard_size: int) -> tuple[float, int]:
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.generate import generate
    from nightshift.stages.plan import plan

    run_dir = RunDir(tempfile.mkdtemp(prefix="nightshift-bench-"))
    shards = plan(batch_path, run_dir, shard_size).shards
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:  # what the flow's task runner does
        results = list(pool.map(lambda s: generate(s, job, run_dir), shards))
    elapsed = time.perf_counter() - start
    shutil.rmtree(run_dir.root, ignore_errors=True)
    assert sum(r.succeeded for r in results) == sum(s.num_rows for s in shards)
    return elapsed, sum(r.completion_tokens for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import json

    from nightshift.engine.local import get_engine, shutdown_engine
    from nightshift.jobs import make_job

    job = make_job(args.model, chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs)
    engine = get_engine(job.engine)
    requests = build_requests(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = str(Path(tmp) / "batch.jsonl")
        with open(batch_path, "w") as out:
            out.writelines(json.dumps(r) + "\n" for r in requests)
        run_raw(engine, requests[:64])  # warm-up
        raw, ours = [], []
        for _ in range(args.rounds):
            raw.append(run_raw(engine, requests))
            ours.append(run_pipeline(job, batch_path, args.shard_size))
    shutdown_engine()

    raw_tps = sum(t for _, t in raw) / sum(s for s, _ in raw)
    our_tps = sum(t for _, t in ours) / sum(s for s, _ in ours)
    print(f"model={args.model} requests={args.requests} shards of {args.shard_size}, chunks of {args.chunk_size}")
    for name, runs in (("raw LLM.chat", raw), ("generate stage", ours)):
        print(f"{name:>15}: " + ", ".join(f"{s:.1f} s / {t} tok = {t / s:.0f} tok/s" for s, t in runs))
    print(f"throughput ratio (generate stage / raw LLM.chat): {our_tps / raw_tps:.3f}")


if __name__ == "__main__":
    main()
