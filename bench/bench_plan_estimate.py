"""`nightshift plan`'s estimate against the run it estimated: same machine, same model.

    .venv/bin/python bench/bench_plan_estimate.py                          # tiny: 300-row history, 2,000-row night
    .venv/bin/python bench/bench_plan_estimate.py --model smollm2 --history-rows 40 --rows 120

One earlier run (its own rows) is the history; then `nightshift plan` estimates tonight's input
(other rows of the same mix) from it, and `nightshift run` runs that input. Printed: prompt
tokens counted by the plan against the run's, completion tokens estimated against generated,
and the plan's hours on one GPU against the run's generate phase (first engine start to last
shard finish) — the ratio is how wrong the estimate was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
NIGHTSHIFT = str(Path(sys.executable).with_name("nightshift"))
QUIET = ["--oracle-samples", "0", "--determinism-samples", "0"]


def write_batch(path: Path, rows: int, seed: int) -> Path:
    from bench_generate import build_requests

    with open(path, "w") as out:
        for request in build_requests(rows, seed=seed):
            request["body"].pop("ignore_eos")  # completions end where the model ends them
            out.write(json.dumps(request) + "\n")
    return path


def nightshift(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([NIGHTSHIFT, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nightshift {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--history-rows", type=int, default=300)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-plan-"))
    history = write_batch(work / "history.jsonl", args.history_rows, seed=1)
    tonight = write_batch(work / "tonight.jsonl", args.rows, seed=2)
    model = ["--model", args.model]
    nightshift("run", str(history), "--output", str(work / "runs" / "history"), *model, *QUIET)
    estimate = ["--history", str(work / "runs"), "--deadline", "1h", "--format", "json"]
    plan = json.loads(nightshift("plan", str(tonight), *model, *estimate))
    nightshift("run", str(tonight), "--output", str(work / "tonight"), *model, *QUIET)
    actual = json.loads((work / "tonight" / "report.json").read_text())

    estimated_s = plan["hours_one_gpu"] * 3600
    print(f"model {args.model}: history {args.history_rows} rows, tonight {args.rows} rows")
    print(f"  prompt tokens       plan {plan['tokens']['prompt_tokens']:>10,}   run {actual['prompt_tokens']:>10,}")
    print(
        f"  completion tokens   plan {plan['completion_tokens_estimate']:>10,}   run {actual['completion_tokens']:>10,}"
        f"   (bound {plan['tokens']['completion_tokens_max']:,})"
    )
    print(
        f"  throughput          plan {plan['throughput']['tokens_per_second']:>10,.1f}   "
        f"run {actual['tokens_per_second']:>10,.1f} tokens/s"
    )
    print(
        f"  generate seconds    plan {estimated_s:>10,.1f}   run {actual['generate_seconds']:>10,.1f}"
        f"   estimate ÷ actual {estimated_s / actual['generate_seconds']:.2f}"
    )
    print(f"  GPUs for a 1 h deadline: {plan['gpus_needed']}")


if __name__ == "__main__":
    main()
