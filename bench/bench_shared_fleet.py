"""Batch on a shared server: what a night's batch through `--engine-url` does to the server's
online traffic, flat out and with the politeness controller (`--online-ttft-slo-ms`).

One vLLM OpenAI server (priority scheduling) and an online load generator at a fixed rate
(streamed chat requests at priority 0, each one's time to first token measured by the client).
The phases, each measured on the same server in the same run:

  idle        online traffic alone
  flat out    online traffic + `nightshift run --engine-url … --engine-priority 10`
  controlled  the same batch with `--online-ttft-slo-ms` (2 × the idle p95 unless --slo-ms)
  N runs      the same rows split over --runs runs started together, each with the objective
              and a controller of its own (uncoordinated: what three nightly jobs did before)
  N, fleet    the same with `--fleet-budget` on a Prefect server of the bench's own, the runs'
              classes urgent, nightly, backfill in turn: one budget for all, shared by weight

Printed: online p50/p95 TTFT per phase (only requests sent while the batch's engine time ran),
the batch's generation throughput, and the ratios the targets are stated in.

    .venv/bin/python bench/bench_shared_fleet.py [--model tiny] [--rows 3000] [--rate 4] [--slo-ms MS] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nightshift.models import resolve_model  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from local_servers import free_port, prefect_server, vllm_server  # noqa: E402

# The server on its own core, the online clients and the batch's process on the other: on one
# small machine, as near as it gets to a GPU server with its clients elsewhere (a CPU vLLM worker
# spins on its cores; a client sharing them starves).
SERVER_CORES = "0"
CLIENT_CORES = {1}
# The batch runs yield that core to the online clients, who stand for users on other machines:
# otherwise three runs' client work (HTTP, JSON, Prefect) delays the online client's own reading
# of its first token, and the bench measures the client core, not the server.
BATCH_NICE = 10


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    arguments = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", "400000000",
                 "--enforce-eager", "--scheduling-policy", "priority"]  # fmt: skip
    return vllm_server(resolve_model(model), model, port, log, arguments, SERVER_CORES)


class OnlineLoad:
    """Streamed chat requests at `rate` per second; each one's send time and time to first token."""

    def __init__(self, url: str, model: str, rate: float) -> None:
        self.url, self.model, self.rate = url, model, rate
        self.samples: list[tuple[float, float]] = []  # (sent at, wall clock; TTFT in ms)
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _one(self, n: int) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": f"Online question {n}: what is new?"}],
                "max_tokens": 8, "temperature": 0, "stream": True}  # fmt: skip
        sent = time.time()
        try:
            with httpx.stream("POST", f"{self.url}/chat/completions", json=body, timeout=120) as response:
                first = None
                for line in response.iter_lines():  # read to the end: the request runs its whole course
                    if first is None and line.startswith("data: ") and '"content"' in line:
                        first = (time.time() - sent) * 1000
            if first is not None:
                with self._lock:
                    self.samples.append((sent, first))
        except httpx.HTTPError:
            with self._lock:
                self.errors += 1

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(1 / self.rate):
            thread = threading.Thread(target=self._one, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
            n += 1

    def __enter__(self) -> OnlineLoad:
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def ttft_between(self, start: float, end: float) -> list[float]:
        with self._lock:
            return [ttft for sent, ttft in self.samples if start <= sent <= end]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_batch(batch: Path, run_dir: Path, url: str, model: str, extra: list[str], env: dict) -> subprocess.Popen:
    priority = [] if "--priority-class" in extra else ["--engine-priority", "10"]
    return subprocess.Popen(
        [sys.executable, "-m", "nightshift.cli", "run", str(batch), "--output", str(run_dir), "--model", model,
         "--engine-url", url, *priority, "--oracle-samples", "0", "--determinism-samples", "0", *extra],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NIGHTSHIFT_CPU_ALL_CORES": "0", **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(BATCH_NICE),
    )  # fmt: skip


def measured(run_dirs: list[Path]) -> dict:
    """The runs' engine time together (first row of any to last of all) and tokens, per run too."""
    metrics = {d: [json.loads(p.read_text()) for p in d.glob("shards/*/metrics.json")] for d in run_dirs}
    every = [m for ms in metrics.values() for m in ms]
    started, finished = min(m["engine_started"] for m in every), max(m["engine_finished"] for m in every)
    tokens = {d: sum(m["tokens_generated"] for m in ms) for d, ms in metrics.items()}
    ends = {d: max(m["engine_finished"] for m in ms) for d, ms in metrics.items()}
    limits = [look[2] for m in every for look in (m.get("politeness") or [])]
    total = sum(tokens.values())
    return {"started": started, "finished": finished, "tokens_per_s": total / (finished - started),
            "limits": limits, "each": [(tokens[d] / (ends[d] - started), ends[d] - started)
                                       for d in run_dirs]}  # fmt: skip


def run_batches(batch: Path, run_dirs: list[Path], url: str, model: str, extras: list[list[str]], env=None) -> dict:
    """The runs started together, each with its own extra options; measured once all are done."""
    runs = [start_batch(batch, d, url, model, extra, env or {}) for d, extra in zip(run_dirs, extras)]
    for run in runs:
        _, err = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"a batch failed ({run.returncode}): {err[-3000:]}")
    return measured(run_dirs)


def run_batch(batch: Path, run_dir: Path, url: str, model: str, extra: list[str]) -> dict:
    return run_batches(batch, [run_dir], url, model, [extra])


CLASSES = ("urgent", "nightly", "backfill")


def write_batch(path: Path, rows: int, tokens: int) -> Path:
    with open(path, "w") as out:
        for i in range(rows):
            body = {"messages": [{"role": "user", "content": f"Batch document {i}: summarize it."}],
                    "max_tokens": tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
            out.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")
    return path


def phases(args, scratch: Path, url: str, online: OnlineLoad) -> tuple[list, float]:
    """Each phase's (name, measured batch, online TTFTs while it ran); the objective."""
    time.sleep(5)  # warm
    idle_start = time.time()
    time.sleep(args.idle_s)
    idle = online.ttft_between(idle_start, time.time())
    slo = args.slo_ms or 2 * percentile(idle, 0.95)
    batch = write_batch(scratch / "batch.jsonl", args.rows, args.tokens)
    part = write_batch(scratch / "part.jsonl", args.rows // args.runs, args.tokens)  # the same work, in N runs
    objective = ["--online-ttft-slo-ms", f"{slo:.1f}"]
    done = [("idle", None, idle)]
    plans = [
        ("flat out", batch, [[]], {}),
        ("controlled", batch, [objective], {}),
        (f"{args.runs} runs, each its own controller", part, [objective] * args.runs, {}),
    ]
    with prefect_server(scratch / "prefect") if args.runs > 1 else nullcontext() as api:
        if api:  # the fleet budget's, of the bench's own (the runs' temporary servers share nothing)
            budget = [[*objective, "--fleet-budget", "--priority-class", CLASSES[i % 3]] for i in range(args.runs)]
            plans.append((f"{args.runs} runs, one fleet budget", part, budget, {"PREFECT_API_URL": api}))
        for n, (name, rows, extras, env) in enumerate(plans):
            dirs = [scratch / f"phase{n}-run{i}" for i in range(len(extras))]
            phase = run_batches(rows, dirs, url, args.model, extras, env)
            done.append((name, phase, online.ttft_between(phase["started"], phase["finished"])))
    return done, slo


def print_table(args, done: list, slo: float, errors: int) -> None:
    idle_p95 = percentile(done[0][2], 0.95)
    flat = done[1][1]["tokens_per_s"]
    print(f"# Shared fleet: {args.model}, {args.rows} batch rows × {args.tokens} tokens, online {args.rate}/s")
    print(f"objective: online p95 TTFT ≤ {slo:.0f} ms\n")
    print("| phase | online TTFT p50 | online TTFT p95 | p95 × idle | online requests | batch tokens/s | × flat out |")
    print("|---|---|---|---|---|---|---|")
    for name, phase, ttft in done:
        p50, p95 = percentile(ttft, 0.5), percentile(ttft, 0.95)
        rate = f"{phase['tokens_per_s']:,.0f} | {phase['tokens_per_s'] / flat:.2f}×" if phase else "— | —"
        print(f"| {name} | {p50:.0f} ms | {p95:.0f} ms | {p95 / idle_p95:.2f}× | {len(ttft)} | {rate} |")
    for name, phase, _ in done[1:]:
        if phase["limits"]:
            limits = phase["limits"]
            print(f"\n{name}: in-flight limit min {min(limits)}, median {statistics.median(limits):.0f}, "
                  f"max {max(limits)}")  # fmt: skip
    if len(done) > 4:  # equal work each: a heavier class's run should end sooner
        each = done[4][1]["each"]
        said = ", ".join(
            f"{CLASSES[i % 3]} {rate:,.0f} tokens/s, done at +{end:.0f} s" for i, (rate, end) in enumerate(each)
        )
        print(f"\nfleet budget, each class's run (the same rows each): {said}")
    print(f"online requests that failed: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per batch row")
    parser.add_argument("--rate", type=float, default=4.0, help="online requests per second")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--slo-ms", type=float, default=None, help="the objective (default: 2 × idle p95)")
    parser.add_argument("--runs", type=int, default=3, help="runs at once in the fleet phases (1: none)")
    args = parser.parse_args()

    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, CLIENT_CORES)  # this process and the batch runs it starts
    scratch = Path(tempfile.mkdtemp(prefix="nightshift-fleet-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_server(args.model, port, scratch / "server.log")
    try:
        with OnlineLoad(url, args.model, args.rate) as online:
            done, slo = phases(args, scratch, url, online)
        errors = online.errors
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    print_table(args, done, slo, errors)


if __name__ == "__main__":
    main()
