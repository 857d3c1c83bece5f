"""Embeddings on the same pipeline: OpenAI `/v1/embeddings` batch lines give the vectors vLLM's
own `run_batch` gives, and a corpus embedded with `--task embed` lands in `embeddings.parquet`,
in input order, readable as-is by DuckDB; bad rows get per-row errors. The real engine (vLLM's
pooling runner on the bundled all-MiniLM-L6-v2), run as a user runs it."""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_jsonl, write_jsonl
from harness import REPO, child_env, kill_what_it_left, run_cli

from nightshift.models import resolve_model
from nightshift.samples import sample_documents

KV_CACHE = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def nightshift(*args: str) -> subprocess.CompletedProcess:
    return run_cli("run", *args, env=KV_CACHE)


def embedding_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", **body}}


def vectors_by_id(path) -> dict[str, list[list[float]]]:
    found = {}
    for line in read_jsonl(path):
        data = line["response"]["body"]["data"]
        found[line["custom_id"]] = [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32).tolist()
            if isinstance(d["embedding"], str)
            else d["embedding"]
            for d in sorted(data, key=lambda d: d["index"])
        ]
    return found


def test_embedding_lines_give_the_vectors_vllm_run_batch_gives_and_bad_lines_are_per_row_errors(tmp_path):
    docs = sample_documents(10, seed=5)
    lines = [embedding_line(d["id"], input=d["text"]) for d in docs[:6]]
    lines.append(embedding_line("several", input=[docs[6]["text"], docs[7]["text"]]))
    lines.append(embedding_line("b64", input=docs[8]["text"], encoding_format="base64"))
    lines.append(embedding_line("ids", input=[101, 7592, 2088, 102]))
    batch = write_jsonl(tmp_path / "in.jsonl", lines)
    reference_run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(batch),
            "-o",
            str(tmp_path / "ref.jsonl"),
            "--model",
            resolve_model("minilm"),
            "--served-model-name",
            "minilm",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.1",
        ],
        env=child_env(KV_CACHE),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert reference_run.wait(timeout=600) == 0
    kill_what_it_left(reference_run)  # run_batch leaves its engine processes behind, holding memory
    # Ours gets three lines more, which it answers with per-row errors: a line for another
    # endpoint (named in the message), an empty input, an input past the model's context.
    bad_lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}]}},
        embedding_line("empty", input=""),
        embedding_line("too-long", input=list(range(1000, 1700))),
    ]  # fmt: skip
    ours_batch = write_jsonl(tmp_path / "ours.jsonl", lines + bad_lines)
    ours = nightshift(str(ours_batch), "--output", str(tmp_path / "run"), "--model", "minilm", "--shard-size", "4")
    assert ours.returncode == 0, ours.stderr[-3000:]
    errors = {line["custom_id"]: line["error"] for line in read_jsonl(tmp_path / "run" / "errors.jsonl")}
    assert errors.keys() == {"chat", "empty", "too-long"}
    assert errors["chat"]["code"] == "unsupported_url" and "/v1/embeddings" in errors["chat"]["message"]
    assert errors["empty"]["code"] == "missing_input"
    assert errors["too-long"]["code"] == "context_length_exceeded"

    reference, produced = vectors_by_id(tmp_path / "ref.jsonl"), vectors_by_id(tmp_path / "run" / "output.jsonl")
    assert produced.keys() == reference.keys() == {line["custom_id"] for line in lines}
    for custom_id, vectors in reference.items():
        assert len(produced[custom_id]) == len(vectors), custom_id
        for ours_vector, their_vector in zip(produced[custom_id], vectors):
            assert np.allclose(ours_vector, their_vector, atol=1e-5), custom_id
    first = read_jsonl(tmp_path / "run" / "output.jsonl")[0]["response"]["body"]
    assert first["object"] == "list" and first["data"][0]["object"] == "embedding" and first["model"] == "minilm"
    assert first["usage"]["prompt_tokens"] == first["usage"]["total_tokens"] > 0


def test_a_corpus_embeds_into_a_parquet_file_duckdb_reads_with_bad_rows_as_errors(tmp_path):
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = sample_documents(40, seed=9)
    texts = [d["text"] for d in docs]
    texts[3] = "   "  # empty: a per-row error
    texts[7] = "lorem ipsum " * 600  # far past MiniLM's limit: truncated, counted
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": [d["id"] for d in docs], "body": texts}), corpus)

    done = nightshift(
        str(corpus), "--output", str(tmp_path / "run"), "--task", "embed",
        "--id-column", "doc_id", "--text-column", "body", "--shard-size", "16", "--chunk-size", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # every row accounted for, one of them as an error

    run = tmp_path / "run"
    table = pq.read_table(run / "embeddings.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    expected = [d["id"] for i, d in enumerate(docs) if i != 3]
    assert table["id"].to_pylist() == expected  # input order, every row but the empty one
    [error] = read_jsonl(run / "errors.jsonl")
    assert error["custom_id"] == docs[3]["id"] and error["error"]["code"] == "empty_prompt"
    assert not (run / "output.jsonl").read_text(), "no JSON lines of floats for a corpus"
    report = json.loads((run / "report.json").read_text())
    tokens = dict(zip(table["id"].to_pylist(), table["tokens"].to_pylist()))
    assert tokens[docs[7]["id"]] == report["max_model_len"]  # cut to the model's limit (MiniLM: 256)
    assert report["truncation_share"] > 0  # and counted
    assert report["rows_per_second"] > 0 and report["cost_per_million_rows"] > 0
    embedding_apis = {"openai-batch-text-embedding-3-small", "openai-batch-text-embedding-3-large"}
    assert set(report["managed_api_cost"]) == embedding_apis  # priced against embedding APIs, not chat ones
    oracle = json.loads((run / "validation.json").read_text())["checks"]["embedding_oracle"]
    assert len(oracle["results"]) == 3 and oracle["min_cosine"] >= 0.999  # transformers on the same weights agrees

    with duckdb.connect() as con:
        nearest = con.sql(
            f"""
            SELECT b.id, array_cosine_similarity(a.embedding::FLOAT[384], b.embedding::FLOAT[384]) AS cosine
            FROM '{run / "embeddings.parquet"}' a, '{run / "embeddings.parquet"}' b
            WHERE a.id = '{docs[0]["id"]}' ORDER BY cosine DESC LIMIT 2
            """
        ).fetchall()
    assert nearest[0][0] == docs[0]["id"] and nearest[0][1] == pytest.approx(1.0, abs=1e-5)
    assert nearest[1][1] < 0.9999
