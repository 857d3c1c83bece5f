"""Batch on a shared server: what a night's batch through `--engine-url` does to the server's
online traffic, flat out and with the politeness controller (`--online-ttft-slo-ms`).

One vLLM OpenAI server (priority scheduling) and an online load generator at a fixed rate
(streamed chat requests at priority 0, each one's time to first token measured by the client).
Three phases, each measured on the same server in the same run:

  idle        online traffic alone
  flat out    online traffic + `nightshift run --engine-url … --engine-priority 10`
  controlled  the same batch with `--online-ttft-slo-ms` (2 × the idle p95 unless --slo-ms)

Printed: online p50/p95 TTFT per phase (only requests sent while the batch's engine time ran),
the batch's generation throughput, and the ratios the targets are stated in.

    .venv/bin/python bench/bench_shared_fleet.py [--model tiny] [--rows 3000] [--rate 4] [--slo-ms MS]
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
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nightshift.models import resolve_model  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from local_servers import free_port, vllm_server  # noqa: E402

# The server on its own core, the online clients and the batch's process on the other: on one
# small machine, as near as it gets to a GPU server with its clients elsewhere (a CPU vLLM worker
# spins on its cores; a client sharing them starves).
SERVER_CORES = "0"
CLIENT_CORES = {1}


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


def run_batch(batch: Path, run_dir: Path, url: str, model: str, extra: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "nightshift.cli", "run", str(batch), "--output", str(run_dir), "--model", model,
         "--engine-url", url, "--engine-priority", "10", "--oracle-samples", "0", "--determinism-samples", "0",
         *extra],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NIGHTSHIFT_CPU_ALL_CORES": "0"}, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the batch failed ({done.returncode}): {done.stderr[-3000:]}")
    metrics = [json.loads(p.read_text()) for p in run_dir.glob("shards/*/metrics.json")]
    started = min(m["engine_started"] for m in metrics)
    finished = max(m["engine_finished"] for m in metrics)
    tokens = sum(m["tokens_generated"] for m in metrics)
    limits = [look[2] for m in metrics for look in (m.get("politeness") or [])]
    return {"started": started, "finished": finished, "tokens_per_s": tokens / (finished - started), "limits": limits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per batch row")
    parser.add_argument("--rate", type=float, default=4.0, help="online requests per second")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--slo-ms", type=float, default=None, help="the objective (default: 2 × idle p95)")
    args = parser.parse_args()

    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, CLIENT_CORES)  # this process and the batch runs it starts
    scratch = Path(tempfile.mkdtemp(prefix="nightshift-fleet-"))
    batch = scratch / "batch.jsonl"
    with open(batch, "w") as out:
        for i in range(args.rows):
            body = {"messages": [{"role": "user", "content": f"Batch document {i}: summarize it."}],
                    "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
            out.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_server(args.model, port, scratch / "server.log")
    try:
        with OnlineLoad(url, args.model, args.rate) as online:
            time.sleep(5)  # warm
            idle_start = time.time()
            time.sleep(args.idle_s)
            idle = online.ttft_between(idle_start, time.time())
            slo = args.slo_ms or 2 * percentile(idle, 0.95)
            flat = run_batch(batch, scratch / "flat", url, args.model, [])
            flat_ttft = online.ttft_between(flat["started"], flat["finished"])
            polite = run_batch(batch, scratch / "polite", url, args.model, ["--online-ttft-slo-ms", f"{slo:.1f}"])
            polite_ttft = online.ttft_between(polite["started"], polite["finished"])
        errors = online.errors
    finally:
        os.killpg(server.pid, signal.SIGKILL)

    idle_p95 = percentile(idle, 0.95)
    print(f"# Shared fleet: {args.model}, {args.rows} batch rows × {args.tokens} tokens, online {args.rate}/s")
    print(f"objective: online p95 TTFT ≤ {slo:.0f} ms\n")
    print("| phase | online TTFT p50 | online TTFT p95 | p95 × idle | online requests | batch tokens/s | × flat out |")
    print("|---|---|---|---|---|---|---|")
    print(f"| idle | {percentile(idle, 0.5):.0f} ms | {idle_p95:.0f} ms | 1.00× | {len(idle)} | — | — |")
    for name, phase, ttft in (("flat out", flat, flat_ttft), ("controlled", polite, polite_ttft)):
        p50, p95 = percentile(ttft, 0.5), percentile(ttft, 0.95)
        print(
            f"| {name} | {p50:.0f} ms | {p95:.0f} ms | {p95 / idle_p95:.2f}× | {len(ttft)} | "
            f"{phase['tokens_per_s']:,.0f} | {phase['tokens_per_s'] / flat['tokens_per_s']:.2f}× |"
        )
    if polite["limits"]:
        limits = polite["limits"]
        median = statistics.median(limits)
        print(f"\ncontrolled in-flight limit: min {min(limits)}, median {median:.0f}, max {max(limits)}")
    print(f"online requests that failed: {errors}")


if __name__ == "__main__":
    main()
