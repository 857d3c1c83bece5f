"""Kills on a flaky bucket: a job on an `s3://` run directory, through a fault proxy that fails a
share of the bucket's requests (throttled, internal errors, stalls, dropped connections), killed
with SIGKILL — the whole process group, engine included — at a random moment, then resumed from
another empty working directory; each trial's outputs checked against one uninterrupted run of
the same job through the same proxy.

A trial is clean when every input row is in `output.jsonl` or `errors.jsonl` exactly once, in
input order, each line equal to the uninterrupted run's but for its `created` time, no
half-written object is left in the bucket, and the working directories stay empty.

    .venv/bin/python bench/drill_kill.py --trials 20 [--rows 240] [--fault-rate 0.1] [--seed 0]

A real S3-compatible server (moto's, from .venv-s3) is started unless --endpoint names one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]

from fault_proxy import FaultyS3Proxy  # noqa: E402  (the suite's fault proxy: the same faults)
from local_servers import moto_s3  # noqa: E402

KEY, SECRET = "nightshift-drill", "drill-secret"


@dataclass
class Trial:
    killed_at_s: float
    stage: str  # how far the killed run had got
    resumes: int
    clean: bool
    differing_lines: int
    problems: list[str]


class Drill:
    def __init__(self, endpoint: str, rows: int, fault_rate: float, seed: int, stall_s: float = 1.0) -> None:
        import s3fs

        self.endpoint, self.rows, self.random = endpoint, rows, random.Random(seed)
        self.fs = s3fs.S3FileSystem(
            key=KEY, secret=SECRET, client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False
        )
        self.bucket = f"drill-{uuid.uuid4().hex[:8]}"
        self.fs.mkdir(self.bucket)
        self.ids = [f"req-{i:04d}" for i in range(rows)]
        lines = [
            json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "tiny", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                                 "messages": [{"role": "user", "content": f"Write about item {custom_id}."}]}})
            for custom_id in self.ids
        ]  # fmt: skip
        lines.insert(rows // 2, '{"custom_id": "not json')  # a bad line: it must end in errors.jsonl once
        self.fs.pipe(f"{self.bucket}/in.jsonl", ("\n".join(lines) + "\n").encode())
        self.proxy = FaultyS3Proxy(endpoint, fault_rate=fault_rate, stall_s=stall_s, seed=seed)
        self.work = Path(tempfile.mkdtemp(prefix="nightshift-drill-"))

    def command(self, run: str) -> list[str]:
        return [sys.executable, "-m", "nightshift.cli", "run", f"s3://{self.bucket}/in.jsonl", "--output",
                f"s3://{self.bucket}/{run}", "--model", "tiny", "--shard-size", "30", "--chunk-size", "16",
                "--max-num-seqs", "8", "--oracle-samples", "0"]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.proxy.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def start(self, run: str) -> tuple[subprocess.Popen, Path]:
        cwd = self.work / f"{run}-{uuid.uuid4().hex[:6]}"
        cwd.mkdir()
        process = subprocess.Popen(self.command(run), cwd=cwd, env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        return process, cwd

    def run_to_the_end(self, run: str) -> tuple[float, Path]:
        began = time.monotonic()
        process, cwd = self.start(run)
        output = process.communicate(timeout=1200)[0]
        if process.returncode != 0:
            raise RuntimeError(f"{run} exited {process.returncode}: {output[-3000:]}")
        return time.monotonic() - began, cwd

    def lines(self, run: str, name: str) -> list[dict]:
        text = self.fs.cat(f"{self.bucket}/{run}/{name}").decode()
        lines = [json.loads(line) for line in text.splitlines()]
        for line in lines:
            (line.get("response") or {}).get("body", {}).pop("created", None)
        return lines

    def stage(self, run: str) -> str:
        found = self.fs.find(f"{self.bucket}/{run}")
        if any(key.endswith("report.json") for key in found):
            return "report"
        if any(key.endswith("output.jsonl") for key in found):
            return "merged"
        chunks = sum("chunk-" in key for key in found)
        if chunks:
            return f"generating ({chunks} chunks)"
        if any(key.endswith("plan/manifest.json") for key in found):
            return "planned, no chunk yet"
        return "before the plan"

    def trial(self, index: int, reference_s: float, reference: dict[str, list[dict]]) -> Trial:
        run = f"trial-{index:02d}"
        process, first_cwd = self.start(run)
        killed_at = self.random.uniform(1.0, reference_s)
        try:
            process.wait(timeout=killed_at)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        stage = self.stage(run)
        resumes, problems = 0, []
        while True:  # a resume that itself fails (the bucket failing too often) is resumed again
            resumes += 1
            finished, cwd = self.start(run)
            output = finished.communicate(timeout=1200)[0]
            if finished.returncode == 0:
                break
            if resumes == 3:
                problems.append(f"resume exited {finished.returncode}: {output[-500:]}")
                break
        differing = 0
        if not problems:
            outputs, errors = self.lines(run, "output.jsonl"), self.lines(run, "errors.jsonl")
            answered = [line["custom_id"] for line in outputs] + [line["custom_id"] for line in errors]
            if sorted(answered, key=str) != sorted([*self.ids, None], key=str):
                problems.append("a row missing or twice")
            if [line["custom_id"] for line in outputs] != [c for c in self.ids if c in set(answered)]:
                problems.append("outputs out of input order")
            differing = sum(a != b for a, b in zip(outputs, reference["output.jsonl"]))
            if errors != reference["errors.jsonl"]:
                problems.append("errors.jsonl differs")
        if [key for key in self.fs.find(f"{self.bucket}/{run}") if ".tmp" in key]:
            problems.append("a half-written object")
        if any(any(path.iterdir()) for path in (first_cwd, cwd)):
            problems.append("a working directory is not empty")
        return Trial(round(killed_at, 1), stage, resumes, not problems and differing == 0, differing, problems)


def drill(
    trials: int,
    rows: int = 240,
    fault_rate: float = 0.1,
    seed: int = 0,
    endpoint: str | None = None,
    stall_s: float = 1.0,
):
    """Run the drill; returns (the uninterrupted run's seconds, the trials, the proxy's counts)."""
    server = None
    if endpoint is None:
        server, endpoint = moto_s3()
    try:
        exercise = Drill(endpoint, rows, fault_rate, seed, stall_s)
        with exercise.proxy:
            reference_s, _ = exercise.run_to_the_end("uninterrupted")
            reference = {name: exercise.lines("uninterrupted", name) for name in ("output.jsonl", "errors.jsonl")}
            results = [exercise.trial(index, reference_s, reference) for index in range(trials)]
        return reference_s, results, dict(exercise.proxy.counts)
    finally:
        if server is not None:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint", help="an S3-compatible server to use (default: start moto's)")
    args = parser.parse_args()
    reference_s, results, counts = drill(args.trials, args.rows, args.fault_rate, args.seed, args.endpoint)
    print(f"uninterrupted run: {reference_s:.1f} s; {args.rows} rows + 1 bad line; bucket requests: {counts}")
    print("| trial | killed at | stage reached | resumes | lines unlike the uninterrupted run's | clean |")
    print("|---|---|---|---|---|---|")
    for index, trial in enumerate(results):
        verdict = "yes" if trial.clean else f"**no**: {'; '.join(trial.problems) or 'outputs differ'}"
        cells = [index, f"{trial.killed_at_s} s", trial.stage, trial.resumes, trial.differing_lines, verdict]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"{sum(t.clean for t in results)}/{len(results)} trials clean")


if __name__ == "__main__":
    main()
