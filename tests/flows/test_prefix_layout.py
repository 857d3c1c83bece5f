"""Rows sharing a prompt prefix are gathered into one shard and reach the engine together; the
report measures what vLLM's prefix cache served, and `nightshift plan` predicted it before the run."""

import json
import random

import pyarrow.parquet as pq
from conftest import chat_request, read_jsonl, write_jsonl

WORDS = "invoice client quarter payment overdue contract supplier delivery audit budget".split()


def questions_about_documents(path, documents=6, questions=4):
    """Rows of one document share a ~330-token prefix (two of the CPU engine's 128-token blocks),
    scattered through the file as an export leaves them."""
    rows = []
    for d in range(documents):
        text = " ".join(random.Random(d).choice(WORDS) for _ in range(80))
        rows += [(f"doc{d}-q{q}", f"Document {d}:\n{text}\n\nQuestion {q}: what is due?") for q in range(questions)]
    random.Random(0).shuffle(rows)
    return write_jsonl(path, [chat_request(custom_id, content) for custom_id, content in rows])


def test_questions_about_one_document_reuse_its_cached_prefix_as_the_plan_predicted(tmp_path, prefect_server, tiny_job):
    from nightshift.flows.run import run_job
    from nightshift.records import Plan, RunReport
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.estimate import count_tokens, load_tokenizer, prefix_cache_shape

    path = questions_about_documents(tmp_path / "in.jsonl")
    run_dir = RunDir(str(tmp_path / "run"))
    report = run_job(str(path), str(run_dir.root), tiny_job, shard_size=8)
    assert report.complete
    plan = Plan.load(run_dir.plan_manifest)
    assert plan.layout == "prefix-groups"
    shards_of = {}
    for shard in plan.shards:
        for custom_id in pq.read_table(shard.path)["custom_id"].to_pylist():
            shards_of.setdefault(custom_id.split("-")[0], set()).add(shard.index)
    assert all(len(shards) == 1 for doc, shards in shards_of.items() if doc.startswith("doc")), shards_of

    outputs = read_jsonl(tmp_path / "run" / "output.jsonl")
    assert [o["custom_id"] for o in outputs] == [r["custom_id"] for r in read_jsonl(path)], "input order kept"
    report_json = json.loads(run_dir.report_json.read_text())
    measured = report_json["prefix_cache_hit_rate"]
    settings = report_json["engine_settings"]  # as vLLM resolved them, its defaults filled in
    assert settings["enable_prefix_caching"] and settings["block_size"] == 128 and settings["kv_cache_tokens"] > 0
    assert settings["max_num_seqs"] == 16 and settings["max_num_batched_tokens"] > 0
    predicted = count_tokens(plan, load_tokenizer(tiny_job), 2048, prefix_cache_shape(tiny_job))
    # three of a document's four rows hit its two shared blocks: ~0.75 × 256/340 (canaries dilute it)
    assert 0.4 < measured <= 0.75
    assert abs(measured - predicted.prefix_cache_hit_rate_predicted) < 0.1, (measured, predicted)

    # Each line says what the prefix cache served it, in OpenAI's usage.prompt_tokens_details (the
    # engine's own count per request); the lines add up to the merged report's and to the hit rate.
    usage = [o["response"]["body"]["usage"] for o in outputs]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    assert all(0 <= c <= u["prompt_tokens"] for c, u in zip(cached, usage)) and sum(cached) > 0
    assert sum(c > 0 for c in cached) >= 6 * 2, "most questions after a document's first are served from cache"
    assert RunReport.load(run_dir.summary).cached_tokens == sum(cached)
    assert abs(sum(cached) / sum(u["prompt_tokens"] for u in usage) - measured) < 0.15
