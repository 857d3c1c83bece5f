"""The embed stage against sentence-transformers `encode`, same documents, same machine, same run.

    .venv/bin/pip install -e ".[bench]"                # sentence-transformers: the baseline
    .venv/bin/python bench/bench_embed.py              # MiniLM, 2,000 documents, 2 rounds
    .venv/bin/python bench/bench_embed.py --docs 500 --rounds 1

Each round embeds the same documents (the sample corpus: a few sentences each, varied lengths)
through sentence-transformers `encode` at batch 64 and 256 (its own defaults otherwise: length-
sorted batches, mean pooling, L2 normalisation) and through Nightshift's embed stage (plan a
corpus with `task="embed"`, generate its shards on the pooling engine as the flow does, two
shards in flight). The engine starts once, before timing. Printed: documents/s of each, the
ratio embed stage ÷ the better sentence-transformers batch size (above 1: Nightshift is
faster), and the largest distance between the two implementations' vectors (1 − cosine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def documents(count: int) -> list[dict]:
    from nightshift.samples import sample_documents

    docs = sample_documents(min(count, 1000))
    return [{"id": f"doc-{i:06d}", "text": docs[i % len(docs)]["text"] + f" (copy {i})"} for i in range(count)]


def run_stage(job, corpus: str, shard_size: int) -> tuple[float, dict]:
    import pyarrow.parquet as pq

    from nightshift.config import CorpusOptions
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.generate import generate
    from nightshift.stages.merge import merge
    from nightshift.stages.plan import plan

    run_dir = RunDir(tempfile.mkdtemp(prefix="nightshift-bench-embed-"))
    planned = plan(corpus, run_dir, shard_size, CorpusOptions(id_column="id", text_column="text", task="embed"))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:  # what the flow's task runner does
        results = list(pool.map(lambda s: generate(s, job, run_dir), planned.shards))
    elapsed = time.perf_counter() - start
    merge(planned, results, run_dir)
    table = pq.read_table(run_dir.embeddings)
    vectors = dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))
    shutil.rmtree(run_dir.root, ignore_errors=True)
    return elapsed, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from nightshift.engine.local import get_engine, shutdown_engine
    from nightshift.jobs import make_job
    from nightshift.models import resolve_model

    docs = documents(args.docs)
    texts = [d["text"] for d in docs]
    job = make_job(args.model)
    get_engine(job.engine)  # started before timing, as a warm worker's engine is
    reference = SentenceTransformer(resolve_model(args.model), device="cpu")
    reference.encode(texts[:64], batch_size=64)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        corpus = str(Path(tmp) / "corpus.parquet")
        pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": texts}), corpus)
        timings: dict[str, list[float]] = {"st-64": [], "st-256": [], "embed stage": []}
        for _ in range(args.rounds):
            for batch in (64, 256):
                start = time.perf_counter()
                st_vectors = reference.encode(texts, batch_size=batch, normalize_embeddings=True)
                timings[f"st-{batch}"].append(time.perf_counter() - start)
            elapsed, ours = run_stage(job, corpus, args.shard_size)
            timings["embed stage"].append(elapsed)
    shutdown_engine()

    ours_matrix = np.stack([ours[d["id"]] for d in docs])
    cosine = (ours_matrix * st_vectors).sum(1) / (
        np.linalg.norm(ours_matrix, axis=1) * np.linalg.norm(st_vectors, axis=1)
    )
    rate = {name: args.docs * len(runs) / sum(runs) for name, runs in timings.items()}
    best = max(rate["st-64"], rate["st-256"])
    print(f"model={args.model} docs={args.docs} rounds={args.rounds} shards of {args.shard_size}")
    for name, runs in timings.items():
        print(f"{name:>12}: " + ", ".join(f"{s:.1f} s" for s in runs) + f"  → {rate[name]:.0f} docs/s")
    print(f"ratio (embed stage / best sentence-transformers): {rate['embed stage'] / best:.3f}")
    print(f"vectors: min cosine to sentence-transformers {cosine.min():.6f}")


if __name__ == "__main__":
    main()
