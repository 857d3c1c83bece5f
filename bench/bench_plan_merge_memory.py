"""Peak memory of planning, merging and sampling for validation a 100,000-row Parquet corpus,
on local disk or a bucket.

    .venv/bin/python bench/bench_plan_merge_memory.py [--rows 100000]
    .venv/bin/python bench/bench_plan_merge_memory.py --bucket    # corpus and run directory on moto's S3
    .venv/bin/python bench/bench_plan_merge_memory.py --rows 1000000 --without-engine
    .venv/bin/python bench/bench_plan_merge_memory.py --rows 1000000 --without-engine --unique-prefixes

Plan, merge and validation's sampling each run in a fresh process and report that process's
peak RSS; between plan and merge the real generate stage runs the tiny model with
max_tokens=1 (its own process, the engine's memory is not what is measured).
`--without-engine` writes the shards' chunk files directly instead (512 rows each, output
lines of a realistic length), so 1M rows take minutes rather than an hour of generation.
Target: each under 1 GiB.
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

# Peak RSS of this program alone. Not getrusage's ru_maxrss: Linux carries that across fork and
# exec, so a child would report the bench's own peak (the corpus it built) when that is higher.
PEAK_RSS = """
def peak_rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
"""

PLAN = (
    PEAK_RSS
    + """
import sys
from nightshift.config import CorpusOptions
from nightshift.runtime.rundir import RunDir
from nightshift.stages.plan import plan
p = plan(sys.argv[1], RunDir(sys.argv[2]), 10_000, CorpusOptions(id_column="id", text_column="text", max_tokens=1))
print(p.total_rows, peak_rss_kib(), p.layout)
"""
)

GENERATE = """
import sys
from concurrent.futures import ThreadPoolExecutor
from nightshift.engine.local import shutdown_engine
from nightshift.jobs import make_job
from nightshift.records import Plan
from nightshift.runtime.rundir import RunDir
from nightshift.stages.generate import generate
if __name__ == "__main__":
    run_dir = RunDir(sys.argv[1])
    job = make_job("tiny", max_num_seqs=128)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: generate(s, job, run_dir), Plan.load(run_dir.plan_manifest).shards))
    import pickle; pickle.dump({r.shard_index: r.output_dir for r in results}, open(sys.argv[2], "wb"))
    shutdown_engine()
"""

GENERATE_WITHOUT_ENGINE = """
import json, pickle, sys
from nightshift.stages.chunks import shard_cache_key, write_chunk
from nightshift.jobs import make_job
from nightshift.records import Plan
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import read_table
run_dir, job = RunDir(sys.argv[1]), make_job("tiny", max_num_seqs=128)
directories = {}
for shard in Plan.load(run_dir.plan_manifest).shards:
    output_dir = run_dir.shard_output(shard_cache_key(shard, job))
    rows = read_table(shard.path, columns=["row_index", "custom_id"]).to_pylist()
    for start in range(0, len(rows), 512):
        records = []
        for row in rows[start : start + 512]:
            text, n = "A generated answer of a realistic length, " * 4, row["row_index"]
            message = {"role": "assistant", "content": text}
            body = {"id": f"cmpl-{n}", "object": "chat.completion", "model": "tiny",
                    "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 90, "completion_tokens": 40, "total_tokens": 130}}
            response = {"status_code": 200, "request_id": f"req-{n}", "body": body}
            line = {"id": f"batch_req_{n}", "custom_id": row["custom_id"], "response": response, "error": None}
            records.append({"row_index": row["row_index"], "shard": shard.index, "custom_id": row["custom_id"],
                            "ok": True, "line": json.dumps(line), "text": text, "finish_reason": "length",
                            "prompt_tokens": 90, "completion_tokens": 40, "error_code": None, "source": "engine",
                            "embedding": None})
        write_chunk(output_dir, records)
    directories[shard.index] = output_dir
pickle.dump(directories, open(sys.argv[2], "wb"))
"""

MERGE = (
    PEAK_RSS
    + """
import pickle, sys
from nightshift.records import Plan
from nightshift.runtime.rundir import RunDir
from nightshift.stages.merge import _merge_directories
run_dir = RunDir(sys.argv[1])
directories = pickle.load(open(sys.argv[2], "rb"))  # shard index → its output directory
report = _merge_directories(Plan.load(run_dir.plan_manifest), directories, run_dir)
print(report.succeeded + report.failed, peak_rss_kib())
"""
)

# What validation reads of the run before any model is loaded: its sample of greedy chat rows.
SAMPLE = (
    PEAK_RSS
    + """
import sys
from nightshift.jobs import make_job
from nightshift.runtime.rundir import RunDir
from nightshift.validation.rows import checkable_rows
pools = checkable_rows(RunDir(sys.argv[1]), make_job("tiny", max_num_seqs=128), 16)
samples, chat_rows = pools.of("oracle", 16), pools.generated
print(chat_rows, peak_rss_kib())
"""
)


def python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


HOW = {False: "tiny model, max_tokens=1, engine start included", True: "chunk files written without an engine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bucket", action="store_true", help="corpus and run directory on an S3 server (moto)")
    parser.add_argument("--without-engine", action="store_true", help="write the chunk files directly, no engine")
    parser.add_argument("--unique-prefixes", action="store_true", help="rows sharing no prefix (no regrouping)")
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
        # 1,000 documents, each copy scattered every 1,000 rows (the plan regroups them), or with
        # its copy number first: prompts that share nothing, shards kept as input slices
        if args.unique_prefixes:
            texts = [f"(copy {i}) " + docs[i % len(docs)]["text"] for i in range(args.rows)]
        else:
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
        rows, plan_kib, layout = python(PLAN, str(corpus), str(run_dir)).split()
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        python(GENERATE_WITHOUT_ENGINE if args.without_engine else GENERATE, str(run_dir), results)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        merged, merge_kib = python(MERGE, str(run_dir), results).split()
        merge_s = time.perf_counter() - start
        start = time.perf_counter()
        sampled, sample_kib = python(SAMPLE, str(run_dir)).split()
        sample_s = time.perf_counter() - start
    if server:
        server.kill()

    print(f"corpus: {args.rows} rows, {corpus_mib:.1f} MiB of Parquet, {'on S3 (moto)' if server else 'local'}")
    print(f"plan:     {rows} rows in {plan_s:.1f} s, peak RSS {int(plan_kib) / 1024:.0f} MiB, shards: {layout}")
    print(f"generate: {generate_s:.1f} s ({HOW[args.without_engine]})")
    print(f"merge:    {merged} rows in {merge_s:.1f} s, peak RSS {int(merge_kib) / 1024:.0f} MiB")
    print(f"validation's sample: 16 of {sampled} rows in {sample_s:.1f} s, peak RSS {int(sample_kib) / 1024:.0f} MiB")
    print(f"each under 1 GiB: {max(int(plan_kib), int(merge_kib), int(sample_kib)) < 1024 * 1024}")


def _start_s3() -> subprocess.Popen:
    from local_servers import moto_s3

    server, endpoint = moto_s3()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


if __name__ == "__main__":
    main()
