"""Specification of image rows on a vision-language model: `nightshift run` over a batch file whose
chat rows carry `image_url` parts — data: URLs, an image on the bucket, a file on this machine —
answers each, refuses a malformed image per row before the engine sees it, and counts the tokens
the images became in the report."""

import base64
import json
import os
import uuid

import pytest
from conftest import read_jsonl, write_jsonl
from harness import run_cli
from vision_model import IMAGE_TOKENS, build_vision_model, png

from nightshift.models import model_dir


def image_row(custom_id: str, url: str, question: str = "What colour is this?") -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


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
    return name, env


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, bucket_env):
    root = tmp_path_factory.mktemp("images")
    model = build_vision_model(model_dir("tiny"), root / "tiny-vlm")
    (root / "green.png").write_bytes(png((20, 200, 20)))
    bucket, env = bucket_env
    rows = [
        image_row("red-png", data_url(png())),
        image_row("red-jpeg", data_url(png(kind="JPEG"), "image/jpeg")),
        image_row("blue-on-the-bucket", f"s3://{bucket}/scans/blue.jpg"),
        image_row("green-on-disk", str(root / "green.png")),
        image_row("not-an-image", data_url(b"this is not a picture at all")),
        image_row("truncated", data_url(png()[:40])),
        image_row("missing-file", str(root / "nowhere.png")),
        {"custom_id": "text-only", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 6}},
    ]  # fmt: skip
    batch = write_jsonl(root / "in.jsonl", rows)
    done = run_cli(
        "run", str(batch), "--output", str(root / "run"), "--model", str(model), "--max-model-len", "512",
        "--kv-cache-memory-bytes", str(64 * 2**20), env={**os.environ, **env},
    )  # fmt: skip
    return root / "run", done


def test_image_rows_are_answered_and_a_malformed_image_is_that_rows_error(image_run):
    run_dir, done = image_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answered = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(run_dir / "output.jsonl")}
    assert set(answered) == {"red-png", "red-jpeg", "blue-on-the-bucket", "green-on-disk", "text-only"}
    for body in answered.values():
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
    errors = {line["custom_id"]: line["error"] for line in read_jsonl(run_dir / "errors.jsonl")}
    assert {name: error["code"] for name, error in errors.items()} == {
        "not-an-image": "invalid_image",
        "truncated": "invalid_image",
        "missing-file": "invalid_image",
    }
    assert "nowhere.png" in errors["missing-file"]["message"]


def test_the_tokens_images_became_are_counted_in_the_report(image_run):
    run_dir, _ = image_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["image_tokens"] == 4 * IMAGE_TOKENS  # four images answered, each this many <image> tokens
    answered = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(run_dir / "output.jsonl")}
    with_image, text_only = answered["red-png"]["usage"]["prompt_tokens"], answered["text-only"]["usage"]
    assert with_image > IMAGE_TOKENS and text_only["prompt_tokens"] < with_image
    assert "from images" in (run_dir / "report.md").read_text()
