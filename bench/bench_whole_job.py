"""The whole job against vLLM's own `run_batch`: same OpenAI batch file, each tool with its defaults.

    .venv/bin/python bench/bench_whole_job.py                       # tiny model: 3 rounds × 1,000 rows, 1 × 10,000
    .venv/bin/python bench/bench_whole_job.py --model smollm2 --sizes 200:1

Each round runs `python -m vllm.entrypoints.openai.run_batch` and `nightshift run` on the same
file, alternating which goes first, each as a fresh process from start to exit (Nightshift with
its temporary Prefect server, planning, canary validation and report included). Both engines get
the same CPU KV-cache size (run_batch through VLLM_CPU_KVCACHE_SPACE, which it needs on CPU).

Printed per size: wall ratio (Nightshift / run_batch, below 1 is faster), CPU-seconds ratio
(the process trees' user+sys), generate phase against run_batch's batch phase (throughput ratio,
above 1 is faster), planning rows/s, and the orchestrating process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
PYTHON = sys.executable
NIGHTSHIFT = str(Path(sys.executable).with_name("nightshift"))


def write_batch(path: Path, rows: int, served_name: str) -> None:
    from bench_generate import build_requests

    with open(path, "w") as out:
        for request in build_requests(rows):
            request["body"]["model"] = served_name
            out.write(json.dumps(request) + "\n")


def timed(args: list[str], env: dict, markers: tuple[str, ...] = (), ok_exits: tuple[int, ...] = (0,)) -> dict:
    """Run a process tree to its end: wall seconds, CPU seconds of the whole tree, the main
    process's peak RSS, and when each marker first appeared in its output.

    CPU is sampled per process of the tree (user + sys, the last reading of each): the
    rusage of reaped children misses engine processes that their parent never waits for, as
    run_batch's are."""
    seen: dict[str, float] = {}
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    tail: list[str] = []

    def read() -> None:
        for line in process.stdout:
            tail.append(line)
            del tail[:-40]
            for marker in markers:
                if marker in line and marker not in seen:
                    seen[marker] = time.perf_counter() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_rss = 0
    cpu_by_pid: dict[int, float] = {}
    main = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak_rss = max(peak_rss, main.memory_info().rss)
            tree = [main, *main.children(recursive=True)]
        except psutil.Error:
            tree = []
        for member in tree:
            try:
                times = member.cpu_times()
                cpu_by_pid[member.pid] = times.user + times.system
            except psutil.Error:
                pass
        time.sleep(0.25)
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    if process.returncode not in ok_exits:
        raise RuntimeError(f"{args[:3]} exited {process.returncode}:\n{''.join(tail)}")
    cpu = sum(cpu_by_pid.values())
    return {"wall": wall, "cpu": cpu, "peak_rss_mib": peak_rss / 2**20, "markers": seen, "exit": process.returncode}


def run_batch(model: str, served_name: str, input_path: Path, work: Path, kv_gib: int) -> dict:
    output = work / "run_batch_out.jsonl"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "HF_HUB_OFFLINE": "1"}
    result = timed(
        [
            PYTHON,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(input_path),
            "-o",
            str(output),
            "--model",
            model,
            "--served-model-name",
            served_name,
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--seed",
            "0",
        ],
        env,
        markers=("Reading batch from", "Writing outputs to"),
    )
    marks = result["markers"]
    result["phase"] = marks["Writing outputs to"] - marks["Reading batch from"]
    result["ok_rows"] = sum(1 for line in open(output) if json.loads(line).get("error") is None)
    return result


def nightshift(model: str, served_name: str, input_path: Path, work: Path) -> dict:
    run_dir = work / "nightshift_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["HF_HUB_OFFLINE"] = "1"
    result = timed(
        [
            NIGHTSHIFT,
            "run",
            str(input_path),
            "--output",
            str(run_dir),
            "--model",
            model,
            "--served-model-name",
            served_name,
        ],
        env,
        ok_exits=(0, 3),
    )
    # exit 3: every row is out but the canary stage did not validate them (on a random model the
    # oracle's exact greedy agreement is fragile); the job's time is what is measured here
    result["validated"] = result["exit"] == 0
    metrics = [json.loads(p.read_text()) for p in run_dir.glob("shards/*/metrics.json")]
    result["phase"] = max(m["engine_finished"] for m in metrics) - min(m["engine_started"] for m in metrics)
    result["ok_rows"] = sum(1 for _ in open(run_dir / "output.jsonl"))
    return result


def planning_rows_per_second(input_path: Path, rows: int) -> float:
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.plan import plan

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        plan(str(input_path), RunDir(scratch), 10_000)
        return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sizes", default="1000:3,10000:1", help="rows:rounds, comma-separated")
    args = parser.parse_args()

    from nightshift.engine.sizing import cpu_kv_cache_bytes
    from nightshift.jobs import make_job
    from nightshift.models import KNOWN_MODELS, provision

    if args.model in KNOWN_MODELS:
        provision((args.model,))
    job = make_job(args.model)
    model, served = job.engine.model, job.served_model_name
    kv_gib = max(1, math.ceil(cpu_kv_cache_bytes(job.engine) / 2**30))
    print(f"model {served} ({model}); KV cache {kv_gib} GiB for both")
    summary = []
    for size in args.sizes.split(","):
        rows, rounds = (int(x) for x in size.split(":"))
        work = Path(tempfile.mkdtemp(prefix=f"nightshift-whole-{rows}-"))
        input_path = work / "input.jsonl"
        write_batch(input_path, rows, served)
        plan_rate = planning_rows_per_second(input_path, rows)
        pairs = []
        for round_no in range(rounds):
            order = ("run_batch", "nightshift") if round_no % 2 == 0 else ("nightshift", "run_batch")
            pair = {}
            for side in order:
                pair[side] = (
                    run_batch(model, served, input_path, work, kv_gib)
                    if side == "run_batch"
                    else nightshift(model, served, input_path, work)
                )
            rb, ns = pair["run_batch"], pair["nightshift"]
            print(
                f"{rows} rows, round {round_no + 1}: wall {ns['wall']:.1f} vs {rb['wall']:.1f} s; "
                f"CPU {ns['cpu']:.0f} vs {rb['cpu']:.0f} s; generate {ns['phase']:.1f} s vs batch phase "
                f"{rb['phase']:.1f} s; peak RSS {ns['peak_rss_mib']:.0f} vs {rb['peak_rss_mib']:.0f} MiB; "
                f"ok rows {ns['ok_rows']} / {rb['ok_rows']}; validated: {ns['validated']}",
                flush=True,
            )
            pairs.append(pair)
        shutil.rmtree(work, ignore_errors=True)

        def median(side: str, key: str, pairs=pairs) -> float:
            return statistics.median(p[side][key] for p in pairs)

        summary.append(
            {
                "rows": rows,
                "rounds": rounds,
                "wall_ratio": median("nightshift", "wall") / median("run_batch", "wall"),
                "cpu_ratio": median("nightshift", "cpu") / median("run_batch", "cpu"),
                "generate_vs_batch_phase": median("run_batch", "phase") / median("nightshift", "phase"),
                "planning_rows_per_s": plan_rate,
                "nightshift_wall": median("nightshift", "wall"),
                "run_batch_wall": median("run_batch", "wall"),
                "nightshift_cpu": median("nightshift", "cpu"),
                "run_batch_cpu": median("run_batch", "cpu"),
                "nightshift_rss_mib": median("nightshift", "peak_rss_mib"),
                "run_batch_rss_mib": median("run_batch", "peak_rss_mib"),
            }
        )
    print(
        "\n| rows | rounds | Nightshift wall | run_batch wall | wall ratio | CPU s (NS vs RB) | CPU ratio "
        "| generate vs batch phase | planning rows/s | peak RSS MiB (NS vs RB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(
            f"| {s['rows']:,} | {s['rounds']} | {s['nightshift_wall']:.1f} s | {s['run_batch_wall']:.1f} s | "
            f"**{s['wall_ratio']:.2f}×** | {s['nightshift_cpu']:.0f} vs {s['run_batch_cpu']:.0f} | "
            f"{s['cpu_ratio']:.2f}× | {s['generate_vs_batch_phase']:.2f}× | {s['planning_rows_per_s']:,.0f} | "
            f"{s['nightshift_rss_mib']:.0f} vs {s['run_batch_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
