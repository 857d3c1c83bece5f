"""Nightshift and vLLM's own `run_batch` give the same answers to the same batch file.

Both run as a user would run them (separate processes), on SmolLM2 with greedy decoding.
"""

import subprocess
import sys

from conftest import chat_request, read_jsonl, write_jsonl
from harness import REPO, child_env, run_cli

from nightshift.models import resolve_model
from nightshift.samples import sample_documents


def content_by_id(path):
    return {row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"] for row in read_jsonl(path)}


def test_message_content_matches_vllm_run_batch_for_every_custom_id(tmp_path):
    requests = [
        chat_request(
            doc["id"],
            f"Summarize in one sentence:\n\n{doc['text']}",
            model="smollm2",
            max_tokens=40,
            **(
                {
                    "messages": [
                        {"role": "system", "content": "Be concise."},
                        {"role": "user", "content": f"Summarize in one sentence:\n\n{doc['text']}"},
                    ]
                }
                if i % 2
                else {}
            ),
        )
        for i, doc in enumerate(sample_documents(12, seed=3))
    ]
    batch = write_jsonl(tmp_path / "in.jsonl", requests)
    model = resolve_model("smollm2")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(batch),
            "-o",
            str(tmp_path / "ref.jsonl"),
            "--model",
            model,
            "--served-model-name",
            "smollm2",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--gpu-memory-utilization",
            "0.2",
            "--seed",
            "0",
        ],
        check=True,
        env=child_env(),
        cwd=REPO,
        capture_output=True,
    )
    ours = run_cli("run", batch, "--output", tmp_path / "run", "--model", "smollm2", "--shard-size", "5",
                   "--chunk-size", "2")  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]

    reference = content_by_id(tmp_path / "ref.jsonl")
    produced = content_by_id(tmp_path / "run" / "output.jsonl")
    assert len(reference) == len(requests)
    assert produced == reference
    assert all(len(text.split()) >= 5 for text in produced.values())  # real summaries, not empty strings
