"""The whole job through `--engine-url` against vLLM's own OpenAI server of the same model, beside
the same job on the in-process engine, with no online traffic: what the HTTP hop costs.

The in-process run goes first; the server is then started with the engine settings that run
resolved (max_num_seqs, KV cache bytes, dtype, context), and the remote run sends as many rows
at once as the server batches. The server's own start is not counted: in the case this is for,
it is already up. Nor is the temporary Prefect server's: an unmeasured in-process run first
starts the machine's shared one (kept up for the whole bench), so that no measured run pays for
it and the later ones do not ride on it. The in-process run is measured again last, to show how
far the machine drifted meanwhile. Printed: each run's wall time (the `nightshift run` command,
end to end) and its generation time (first engine row to last), and the ratios remote / in-process.

    .venv/bin/python bench/bench_remote_engine.py [--model tiny] [--rows 3000] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nightshift.engine.sizing import engine_arguments  # noqa: E402
from nightshift.jobs import make_job  # noqa: E402
from nightshift.models import resolve_model  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from local_servers import cores_of, free_port, vllm_server  # noqa: E402


def nightshift_run(batch: Path, run_dir: Path, model: str, *extra: str) -> dict:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "nightshift.cli", "run", str(batch), "--output", str(run_dir), "--model", model,
         "--oracle-samples", "0", "--determinism-samples", "0", *extra],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NIGHTSHIFT_SHARED_PREFECT_IDLE_S": "900"},
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"the run failed ({done.returncode}): {done.stderr[-3000:]}")
    metrics = [json.loads(p.read_text()) for p in run_dir.glob("shards/*/metrics.json")]
    report = json.loads((run_dir / "report.json").read_text())
    generation = max(m["engine_finished"] for m in metrics) - min(m["engine_started"] for m in metrics)
    return {"wall_s": wall, "generation_s": generation, "settings": report["engine_settings"], "report": report}


def start_server(model: str, port: int, settings: dict, log: Path, cores: str | None) -> subprocess.Popen:
    """vLLM's server with the engine arguments the in-process run was given (on `cores` only, if given)."""
    arguments = ["--dtype", settings["dtype"], "--max-model-len", str(settings["max_model_len"]),
                 "--max-num-seqs", str(settings["max_num_seqs"]), "--kv-cache-memory-bytes",
                 str(settings["kv_cache_memory_bytes"]), "--seed", str(settings["seed"]),
                 *(["--enforce-eager"] if settings.get("enforce_eager") else [])]  # fmt: skip
    return vllm_server(resolve_model(model), model, port, log, arguments, cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per row")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 256], help="--engine-max-concurrency values to run"
    )
    parser.add_argument(
        "--server-cores",
        help="pin the server to these cores (e.g. 0) and the remote run to the others: the server's CPU "
        "engine spins on every core it has and starves a client beside it, where a GPU server would not",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    batch = work / "in.jsonl"
    with batch.open("w") as out:
        for i in range(args.rows):
            body = {"model": args.model, "max_tokens": args.tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Write about topic {i} and its history."}]}  # fmt: skip
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")

    nightshift_run(batch, work / "warm-up", args.model)  # the shared Prefect server starts here, unmeasured
    local = nightshift_run(batch, work / "local", args.model)
    settings = engine_arguments(make_job(args.model).engine)
    port = free_port()
    server = start_server(args.model, port, settings, work / "server.log", args.server_cores)
    if args.server_cores:  # the remote runs (children of this process) on the other cores
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - cores_of(args.server_cores))
    remote = {}
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for width in args.concurrency:
            flags = ["--engine-url", url, "--engine-max-concurrency", str(width)]
            remote[width] = nightshift_run(batch, work / f"remote-{width}", args.model, *flags)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    again = nightshift_run(batch, work / "local-again", args.model)

    same_tokens = (local["report"]["completion_tokens"], *(r["report"]["completion_tokens"] for r in remote.values()))
    kv_mb = settings["kv_cache_memory_bytes"] / 1e6
    print(f"{args.rows} rows × {args.tokens} tokens, {args.model}; engine: max_num_seqs {settings['max_num_seqs']}, "
          f"KV {kv_mb:.0f} MB; completion tokens per run {same_tokens}")  # fmt: skip
    print("| engine | whole job (wall) | generation | whole job vs in-process |")
    print("|---|---|---|---|")
    runs = [("in-process", local)] + [(f"--engine-url, {w} in flight", r) for w, r in remote.items()]
    runs.append(("in-process, again (last)", again))
    for name, run in runs:
        ratio = run["wall_s"] / local["wall_s"]
        print(f"| {name} | {run['wall_s']:.1f} s | {run['generation_s']:.1f} s | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
