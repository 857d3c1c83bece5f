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


def calls_by_id(path):
    """Each row's tool calls, their ids aside (vLLM draws them at random; Nightshift's are stable)."""
    return {
        row["custom_id"]: [
            call["function"] for call in row["response"]["body"]["choices"][0]["message"].get("tool_calls") or []
        ]
        for row in read_jsonl(path)
    }


CLASSIFY = {
    "type": "function",
    "function": {
        "name": "classify",
        "parameters": {"type": "object", "properties": {"label": {"type": "string", "enum": ["spam", "ham"]}}},
    },
}


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
    # rows with tools the model may call (tool_choice auto): the same text, through the same parser
    requests += [
        chat_request(
            f"tools-{i}", f"Is this spam? {doc['text'][:200]}", model="smollm2", max_tokens=40, tools=[CLASSIFY]
        )
        for i, doc in enumerate(sample_documents(3, seed=4))
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
            "--tool-call-parser",
            "hermes",
            "--enable-auto-tool-choice",
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
    assert len(reference) == len(requests) == 15
    assert produced == reference
    summaries = [text for custom_id, text in produced.items() if not custom_id.startswith("tools-")]
    assert all(len(text.split()) >= 5 for text in summaries)  # real summaries, not empty strings
    assert calls_by_id(tmp_path / "run" / "output.jsonl") == calls_by_id(tmp_path / "ref.jsonl")
