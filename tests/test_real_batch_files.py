"""Specification of a batch file as users' real ones are: base-model rows, rows of two LoRA
adapters, forced tool calls and image rows (data: URLs, an image on the bucket, a file on this
machine) on a small vision-language model, through `nightshift run` and through `nightshift serve`
with the official `openai` client. Every row is answered or refused with its reason (a malformed
image before the engine sees it), adapter rows are gated by the oracle on the PEFT-merged
reference, and the report counts the tokens the images became and each adapter's share."""

import base64
import json
import os
import uuid

import pytest
from conftest import read_jsonl, write_jsonl
from harness import run_cli
from lora_adapters import build_adapter
from test_batch_api import TERMINAL, Server, lines_of, upload, wait_for
from vision_model import IMAGE_TOKENS, build_vision_model, png

from nightshift.models import model_dir

CLASSIFY = {
    "type": "function",
    "function": {
        "name": "classify",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["receipt", "form", "photo"]}},
            "required": ["label"],
        },
    },
}


def chat_row(custom_id: str, content, model: str = "tiny-vlm", **body) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6,
            **body}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def image_row(custom_id: str, url: str, question: str = "What colour is this?", **body) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return chat_row(custom_id, content, **body)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def bucket_env(s3_endpoint):
    import s3fs

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    env = {"AWS_ACCESS_KEY_ID": "nightshift-test", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    fs = s3fs.S3FileSystem(key="nightshift-test", secret=secret, client_kwargs={"endpoint_url": s3_endpoint})
    name = f"images-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.pipe(f"{name}/scans/blue.jpg", png((20, 20, 220), kind="JPEG"))
    return name, env, fs


@pytest.fixture(scope="module")
def models(tmp_path_factory, bucket_env):
    """The vision-language model, and its two adapters: one in a local directory, one on the bucket."""
    root = tmp_path_factory.mktemp("models")
    vlm = build_vision_model(model_dir("tiny"), root / "tiny-vlm")
    support, legal = build_adapter(vlm, root / "support", 1), build_adapter(vlm, root / "legal", 2)
    bucket, fs = bucket_env[0], bucket_env[2]
    fs.put(str(legal), f"{bucket}/adapters/legal", recursive=True)
    return vlm, {"support": support, "legal": f"s3://{bucket}/adapters/legal"}


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory, bucket_env):
    root = tmp_path_factory.mktemp("batch")
    (root / "green.png").write_bytes(png((20, 200, 20)))
    bucket = bucket_env[0]
    forced = {"type": "function", "function": {"name": "classify"}}
    rows = [
        image_row("red-png", data_url(png())),
        chat_row("base-text", "Hello there"),
        image_row("red-jpeg", data_url(png(kind="JPEG"), "image/jpeg"), model="support"),
        chat_row("support-text", "Hello there", model="support"),
        image_row("blue-on-the-bucket", f"s3://{bucket}/scans/blue.jpg"),
        chat_row("legal-text", "Hello there", model="legal"),
        image_row("green-on-disk", str(root / "green.png"), model="legal"),
        image_row("tool-on-image", data_url(png()), "Which kind of document?", tools=[CLASSIFY], tool_choice=forced,
                  max_tokens=20),
        chat_row("tool-support", "Classify: a till slip", model="support", tools=[CLASSIFY], tool_choice=forced,
                 max_tokens=20),
        image_row("not-an-image", data_url(b"this is not a picture at all")),
        image_row("truncated", data_url(png()[:40])),
        image_row("missing-file", str(root / "nowhere.png")),
        chat_row("unknown-adapter", "Hello", model="marketing"),
    ]  # fmt: skip
    rows += [chat_row(f"{model}-{i}", f"Question {i} about the weather", model=model)
             for i in range(3) for model in ("tiny-vlm", "support", "legal")]  # fmt: skip
    return write_jsonl(root / "in.jsonl", rows), rows


ANSWERED = {
    "red-png",
    "base-text",
    "red-jpeg",
    "support-text",
    "blue-on-the-bucket",
    "legal-text",
    "green-on-disk",
    "tool-on-image",
    "tool-support",
    *(f"{m}-{i}" for i in range(3) for m in ("tiny-vlm", "support", "legal")),
}
REFUSED = {"not-an-image": "invalid_image", "truncated": "invalid_image", "missing-file": "invalid_image",
           "unknown-adapter": "model_not_found"}  # fmt: skip


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, bucket_env, models, batch_file):
    root = tmp_path_factory.mktemp("run")
    (vlm, adapters), (batch, _), env = models, batch_file, bucket_env[1]
    done = run_cli(
        "run", str(batch), "--output", str(root / "run"), "--model", str(vlm), "--max-model-len", "512",
        "--kv-cache-memory-bytes", str(64 * 2**20), *(f"--lora={n}={p}" for n, p in adapters.items()),
        env={**os.environ, **env},
    )  # fmt: skip
    return root / "run", done


def test_every_row_is_answered_or_refused_with_its_reason(image_run):
    run_dir, done = image_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answered = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(run_dir / "output.jsonl")}
    assert set(answered) == ANSWERED
    for custom_id, body in answered.items():
        assert body["usage"]["completion_tokens"] > 0, custom_id
    assert answered["red-jpeg"]["model"] == "support" and answered["green-on-disk"]["model"] == "legal"
    for custom_id in ("tool-on-image", "tool-support"):
        (call,) = answered[custom_id]["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"])["label"] in ("receipt", "form", "photo")
    errors = {line["custom_id"]: line["error"] for line in read_jsonl(run_dir / "errors.jsonl")}
    assert {name: error["code"] for name, error in errors.items()} == REFUSED
    assert "nowhere.png" in errors["missing-file"]["message"]


def test_adapter_rows_are_gated_by_the_oracle_on_the_merged_reference(image_run):
    run_dir, _ = image_run
    verdict = json.loads((run_dir / "validation.json").read_text())
    assert verdict["validated"], verdict["failures"]
    oracle = verdict["checks"]["oracle"]
    assert {r["adapter"] for r in oracle["results"]} == {None, "support", "legal"}
    assert all(r["agrees"] for r in oracle["results"])


def test_the_tokens_images_became_are_counted_in_the_report(image_run):
    run_dir, _ = image_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["image_tokens"] == 5 * IMAGE_TOKENS  # five images answered, each this many <image> tokens
    assert set(report["by_model"]) == {"tiny-vlm", "support", "legal"}  # legal's weights came from the bucket
    answered = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(run_dir / "output.jsonl")}
    with_image, text_only = answered["red-png"]["usage"]["prompt_tokens"], answered["base-text"]["usage"]
    assert with_image > IMAGE_TOKENS and text_only["prompt_tokens"] < with_image
    assert "from images" in (run_dir / "report.md").read_text()


def test_the_same_file_through_nightshift_serve_and_the_openai_client(
    tmp_path, models, batch_file, bucket_env, image_run
):
    """The Batch API runs the same file on the same model and adapters: the same rows answered,
    with the same answers, the same rows refused for the same reasons — once the operator has
    opened the directory and the bucket prefix the file's images are in to its tenants (without
    that, a tenant's path or bucket image is media_not_allowed: tests/test_serve_security.py)."""
    (vlm, adapters), (path, rows), (bucket, env) = models, batch_file, bucket_env[:2]
    server = Server(
        tmp_path / "api", "--chat-model", str(vlm), *(f"--chat-lora={n}={p}" for n, p in adapters.items()),
        "--allow-media-root", str(path.parent), "--allow-media-url", f"s3://{bucket}/scans/",
        logs=tmp_path, env={**os.environ, **env},
    ).start()  # fmt: skip
    try:
        client = server.client("key-owner")
        created = client.batches.create(
            input_file_id=upload(client, rows), endpoint="/v1/chat/completions", completion_window="24h"
        )
        finished, _ = wait_for(client, created.id, lambda b: b.status in TERMINAL)
        assert finished.status == "completed", finished.errors
        outputs, errors = lines_of(client, finished.output_file_id), lines_of(client, finished.error_file_id)
    finally:
        server.stop()
    run_dir, _ = image_run
    ran = {line["custom_id"]: line["response"]["body"]["choices"] for line in read_jsonl(run_dir / "output.jsonl")}
    served = {line["custom_id"]: line["response"]["body"]["choices"] for line in outputs}
    assert set(served) == ANSWERED
    assert {c: [x["message"] | {"tool_calls": None} for x in v] for c, v in served.items()} == {
        c: [x["message"] | {"tool_calls": None} for x in v] for c, v in ran.items()
    }  # tool call ids are the run's own; the rest is the same answer
    assert {line["custom_id"]: line["error"]["code"] for line in errors} == REFUSED
