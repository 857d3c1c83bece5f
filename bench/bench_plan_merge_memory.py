"""Peak memory of planning and merging a 100,000-row Parquet corpus, on local disk or a bucket.

    .venv/bin/python bench/bench_plan_merge_memory.py [--rows 100000]
    .venv/bin/python bench/bench_plan_merge_memory.py --bucket    # corpus and run directory on moto's S3

Plan and merge each run in a fresh process and report that process's peak RSS; between
them the real generate stage runs the tiny model with max_tokens=1 (its own process, the
engine's memory is not what is measured). Target: each under 1 GiB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

PLAN = """
import resource, sys
from nightshift.config import CorpusOptions
from nightshift.rundir import RunDir
from nightshift.tasks.plan import plan
p = plan(sys.argv[1], RunDir(sys.argv[2]), 10_000, CorpusOptions(id_column="id", text_column="text", max_tokens=1))
print(p.total_rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

GENERATE = """
import sys
from concurrent.futures import ThreadPoolExecutor
from nightshift.engine import shutdown_engine
from nightshift.jobs import make_job
from nightshift.records import Plan
from nightshift.rundir import RunDir
from nightshift.tasks.generate import generate
if __name__ == "__main__":
    run_dir = RunDir(sys.argv[1])
    job = make_job("tiny", max_num_seqs=128)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: generate(s, job, run_dir), Plan.load(run_dir.plan_manifest).shards))
    import pickle; pickle.dump(results, open(sys.argv[2], "wb"))
    shutdown_engine()
"""

MERGE = """
import pickle, resource, sys
from nightshift.records import Plan
from nightshift.rundir import RunDir
from nightshift.tasks.merge import merge
run_dir = RunDir(sys.argv[1])
report = merge(Plan.load(run_dir.plan_manifest), pickle.load(open(sys.argv[2], "rb")), run_dir)
print(report.succeeded + report.failed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bucket", action="store_true", help="corpus and run directory on an S3 server (moto)")
    args = parser.parse_args()
    server = _start_s3() if args.bucket else None

    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from nightshift.samples import sample_documents

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        docs = sample_documents(1000)
        ids = [f"doc-{i:07d}" for i in range(args.rows)]
        texts = [docs[i % len(docs)]["text"] + f" (copy {i})" for i in range(args.rows)]
        pq.write_table(pa.table({"id": ids, "text": texts}), corpus, row_group_size=8192)
        del ids, texts
        corpus_mib = corpus.stat().st_size / 2**20
        run_dir = Path(tmp) / "run"
        if server:
            import s3fs

            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put_file(str(corpus), "bench/corpus.parquet")
            corpus, run_dir = "s3://bench/corpus.parquet", "s3://bench/run"
        results = str(Path(tmp) / "results.pkl")

        start = time.perf_counter()
        rows, plan_kib = python(PLAN, str(corpus), str(run_dir)).split()
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        python(GENERATE, str(run_dir), results)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        merged, merge_kib = python(MERGE, str(run_dir), results).split()
        merge_s = time.perf_counter() - start
    if server:
        server.kill()

    print(f"corpus: {args.rows} rows, {corpus_mib:.1f} MiB of Parquet, {'on S3 (moto)' if server else 'local'}")
    print(f"plan:     {rows} rows in {plan_s:.1f} s, peak RSS {int(plan_kib) / 1024:.0f} MiB")
    print(f"generate: {generate_s:.1f} s (tiny model, max_tokens=1, engine start included)")
    print(f"merge:    {merged} rows in {merge_s:.1f} s, peak RSS {int(merge_kib) / 1024:.0f} MiB")
    print(f"plan and merge under 1 GiB: {max(int(plan_kib), int(merge_kib)) < 1024 * 1024}")


def _start_s3() -> subprocess.Popen:
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(REPO / ".venv-s3" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.5)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


if __name__ == "__main__":
    main()
