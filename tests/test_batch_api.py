"""`nightshift serve` is OpenAI's Batch API: the official `openai` client's batch flow runs
against it unchanged but for `base_url` and `api_key` — on a real server process, with each batch
a real Nightshift run on the tiny model."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest
from conftest import chat_request
from harness import free_port, start_cli

from nightshift.config import JobSpec

KEYS = ("key-owner", "key-stranger", "key-files", "key-cancel", "key-window", "key-embed")  # a tenant per test
TERMINAL = ("completed", "failed", "expired", "cancelled")
# a cold engine start (12 s in-process) and a first wave of rows fit, on a loaded 2-core machine
# too; 6,000 rows do not
WINDOW_S = 90


class Server:
    """A `nightshift serve` process on a free local port; killed or restarted on demand."""

    def __init__(self, storage: Path | str, *extra: str, logs: Path | None = None, env: dict | None = None) -> None:
        self.storage, self.extra = storage, extra
        self.logs, self.env = logs or Path(storage).parent, env or {}
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self, listen_s: float = 60) -> Server:
        log = open(self.logs / f"server-{self.port}.log", "ab")
        self.process = start_cli(
            "serve", "--storage", self.storage, "--port", self.port, "--chat-model", "tiny", "--poll-s", "0.3",
            *self.extra, env={**self.env, "NIGHTSHIFT_API_KEYS": ",".join(KEYS)}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + listen_s
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                assert self.process.poll() is None, "the server exited at start"
                time.sleep(0.3)
        raise TimeoutError(f"the server did not listen within {listen_s:.0f} s")

    def client(self, key: str = KEYS[0]) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Bucket:
    """A bucket on the session's S3 server, the credentials that reach it, and its secret."""

    name: str
    secret: str
    env: dict[str, str]
    fs: object


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> Bucket:
    import s3fs

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    env = {"AWS_ACCESS_KEY_ID": "nightshift-test", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    fs = s3fs.S3FileSystem(key="nightshift-test", secret=secret, client_kwargs={"endpoint_url": s3_endpoint})
    name = f"api-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return Bucket(name, secret, env, fs)


@pytest.fixture(scope="module")
def server(bucket, warm_engine, tmp_path_factory):
    """One server for the module's tests, keeping its files, batches and runs on a bucket; each
    test is its own tenant (API key), so none sees another's files or batches. Its chat batches
    run on the session's engine server (`--chat-engine-url`), as a Batch API beside an online
    fleet runs them: the subject is the API, not an engine each batch's run would load. (The
    server that is killed and restarted keeps its files on a local disk and its engine in its
    runs: the engine going down with it is that test's subject.)"""
    logs, chat_engine = tmp_path_factory.mktemp("api-logs"), ("--chat-engine-url", warm_engine.url)
    running = Server(f"s3://{bucket.name}/api", *chat_engine, logs=logs, env=bucket.env).start()
    yield running
    running.stop()


def upload(client: openai.OpenAI, rows) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return client.files.create(file=("requests.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch").id


def long_requests(count: int, tokens: int = 256) -> list[dict]:
    """Requests that keep the engine busy for a while: `tokens` each, whatever the model says.

    The engine decodes up to 1,024 of them together, so they finish in waves, a wave lasting
    `tokens` steps: the first wave's rows are committed while the others still run."""
    return [
        chat_request(f"long-{i}", f"A story, number {i}.", max_tokens=tokens, ignore_eos=True) for i in range(count)
    ]


def wait_for(client: openai.OpenAI, batch_id: str, until, timeout: float = 400):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if until(batch):
            return batch, seen
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} still {seen[-1].status}: {seen[-1].request_counts}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_the_sdk_batch_flow_answers_every_request_once(server, bucket):
    client = server.client()
    rows = [chat_request(f"req-{i}", f"Say hello to number {i}.") for i in range(30)]
    rows.insert(7, {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    input_id = upload(client, rows)
    batch = client.batches.create(
        input_file_id=input_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"night": "2026-11-23"},
    )
    assert batch.status == "validating" and batch.metadata == {"night": "2026-11-23"}

    batch, seen = wait_for(client, batch.id, lambda b: b.status in TERMINAL)

    assert batch.status == "completed", batch.errors
    statuses = [b.status for b in seen]
    assert "in_progress" in statuses and statuses.index("in_progress") < statuses.index("completed")
    assert batch.request_counts.model_dump() == {"total": 31, "completed": 30, "failed": 1}
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
    # the canary gate's verdict, where the tenant reads it, beside the tenant's own metadata (issue 50)
    assert batch.metadata["night"] == "2026-11-23" and batch.metadata["nightshift_validation"] == "validated"
    assert batch.metadata["nightshift_validation_detail"] == "passed"
    outputs, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(row["custom_id"] for row in rows)
    assert all(line["response"]["body"]["object"] == "chat.completion" for line in outputs)
    # what the engine's prefix cache served each request, per line and summed in the batch's usage
    cached = [line["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for line in outputs]
    assert batch.usage.input_tokens_details.cached_tokens == sum(cached)
    assert [line["custom_id"] for line in errors] == ["no-messages"]
    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0

    # Files, batches and the run itself live on the bucket; its secret is in no log.
    assert any(path.endswith(f"{batch.id}.json") for path in bucket.fs.ls(f"{bucket.name}/api/batches"))
    assert bucket.fs.exists(f"{bucket.name}/api/batches/{batch.id}/output.jsonl")
    assert bucket.secret not in "".join(p.read_text(errors="replace") for p in server.logs.glob("server-*.log"))

    # Another key sees none of it; no key, or a wrong one, is refused.
    stranger = server.client(KEYS[1])
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        stranger.files.content(batch.output_file_id)
    assert stranger.batches.list().data == [] and stranger.files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        server.client("not-a-key").batches.list()

    # A file deleted is gone; the batch's outputs stay downloadable.
    assert client.files.delete(input_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(input_id)
    assert len(lines_of(client, batch.output_file_id)) == 30


def test_a_file_that_is_not_a_valid_batch_fails_with_its_lines_named(server):
    client = server.client("key-files")
    not_json = upload(client, [chat_request("a", "hi"), "{not json", chat_request("b", "hi")])
    mixed = dict(chat_request("c", "hi"), url="/v1/embeddings")
    mixed_endpoints = upload(client, [chat_request("a", "hi"), mixed])
    repeated = upload(client, [chat_request("a", "hi"), chat_request("a", "again")])
    made = [
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for file_id in (not_json, mixed_endpoints, repeated)
    ]

    failed = [wait_for(client, batch_id, lambda b: b.status in TERMINAL, timeout=60)[0] for batch_id in made]

    assert [b.status for b in failed] == ["failed"] * 3
    assert [(e.code, e.line) for e in failed[0].errors.data] == [("invalid_json_line", 2)]
    assert [(e.code, e.line) for e in failed[1].errors.data] == [("url_mismatch", 2)]
    assert [(e.code, e.line) for e in failed[2].errors.data] == [("duplicate_custom_id", 2)]
    assert all(b.failed_at and b.output_file_id is None for b in failed)
    # Listed newest first, a page at a time, as the client's auto-pagination expects.
    assert [b.id for b in client.batches.list(limit=1)] == made[::-1]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=not_json, endpoint="/v1/images", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=not_json, endpoint="/v1/chat/completions", completion_window="soon")


def test_cancel_mid_run_keeps_finished_rows_and_a_queued_batch_expires(server):
    client = server.client("key-cancel")
    rows = long_requests(3000, tokens=64)
    running = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                    completion_window="24h")  # fmt: skip
    small = [chat_request(f"queued-{i}", "hi") for i in range(5)]
    queued = client.batches.create(input_file_id=upload(client, small), endpoint="/v1/chat/completions",
                                   completion_window="3s")  # fmt: skip
    wait_for(client, running.id, lambda b: b.request_counts.completed > 0)

    cancelling = client.batches.cancel(running.id)
    cancelled, _ = wait_for(client, running.id, lambda b: b.status in TERMINAL)
    expired, _ = wait_for(client, queued.id, lambda b: b.status in TERMINAL)

    assert cancelling.status == "cancelling" and cancelled.status == "cancelled" and cancelled.cancelled_at
    outputs, errors = lines_of(client, cancelled.output_file_id), lines_of(client, cancelled.error_file_id)
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(row["custom_id"] for row in rows)
    assert 0 < len(outputs) < len(rows)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert cancelled.request_counts.model_dump() == {"total": 3000, "completed": len(outputs), "failed": len(errors)}
    # Expired while waiting its turn: every request an error line, as OpenAI writes them.
    assert expired.status == "expired" and expired.expired_at
    expired_lines = lines_of(client, expired.error_file_id)
    assert [(line["custom_id"], line["error"]["code"]) for line in expired_lines] == [
        (row["custom_id"], "batch_expired") for row in small
    ]


@pytest.mark.drill
def test_a_server_killed_mid_batch_resumes_it_when_started_again(tmp_path, warm_engine):
    """A drill (`make drills`): 1,400 rows, a server SIGKILLed mid-batch and started again (200–260 s
    in the suite). The batch's rows go to the test worker's engine server (`--chat-engine-url`): the
    subject is the batch store's resume after a SIGKILL and the killed server's run, which the
    restarted server ends. The suite proves the parts faster: a new server resumes the batch from the
    storage (tests/nightshift/test_batch_lifecycle.py), a killed run resumes from its checkpoints
    (tests/test_preemption.py), and what a dead run left is killed (tests/nightshift/
    test_leftovers.py, test_process_liveness.py)."""
    server = Server(tmp_path / "storage", "--chat-engine-url", warm_engine.url).start()
    client = server.client()
    rows = long_requests(1400, tokens=64)  # in waves (rows decoded together): killed after the first
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    started, _ = wait_for(client, batch.id, lambda b: b.request_counts.completed > 0)

    server.kill()
    assert started.request_counts.completed < len(rows), "killed mid-batch"
    first_run = json.loads((tmp_path / "storage" / "batches" / f"{batch.id}.json").read_text())["run_group"]
    server.start()
    try:
        done, _ = wait_for(server.client(), batch.id, lambda b: b.status in TERMINAL)
        outputs = lines_of(server.client(), done.output_file_id)
    finally:
        server.stop()

    assert done.status == "completed" and done.request_counts.completed == len(rows)
    assert sorted(line["custom_id"] for line in outputs) == sorted(row["custom_id"] for row in rows)
    assert not [p.pid for p in psutil.process_iter() if _group(p.pid) == first_run], "the killed server's run lives on"


def _group_listening_on(port: int) -> int:
    [pid] = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"}
    return os.getpgid(pid)


def _processes_of(group: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter():
        try:
            if _group(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.drill
def test_a_running_batch_keeps_its_completion_window_and_its_finished_rows(server):
    """A drill (`make drills`): it waits out a 90 s window by design. The suite proves the parts
    faster: a batch's run is started with its window as its deadline
    (tests/nightshift/test_batch_lifecycle.py), and a deadline mid-run merges the finished rows
    and expires the rest, every row once (tests/flows/test_deadline.py)."""
    client = server.client("key-window")
    # every 20th row short: rows finish early however many the engine decodes together
    rows = [{**row, "body": {**row["body"], "max_tokens": 8}} if i % 20 == 0 else row
            for i, row in enumerate(long_requests(6000))]  # fmt: skip
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window=f"{WINDOW_S}s")  # fmt: skip
    wait_for(client, batch.id, lambda b: b.request_counts.completed > 0)
    expired, _ = wait_for(client, batch.id, lambda b: b.status in TERMINAL)

    assert expired.status == "expired" and expired.expired_at
    assert expired.expired_at - expired.created_at < WINDOW_S + 60  # the run stopped itself at the window
    outputs, errors = lines_of(client, expired.output_file_id), lines_of(client, expired.error_file_id)
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(row["custom_id"] for row in rows)
    assert 0 < len(outputs) < len(rows) and {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert expired.request_counts.model_dump() == {"total": 6000, "completed": len(outputs), "failed": len(errors)}


def test_an_embeddings_batch_answers_in_openais_embedding_shape(server):
    client = server.client("key-embed")
    rows = [
        {"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "minilm", "input": f"Invoice {i} is overdue by {i} days."}}
        for i in range(8)
    ]  # fmt: skip
    rows.append({"custom_id": "empty", "method": "POST", "url": "/v1/embeddings", "body": {"input": ""}})
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/embeddings",
                                  completion_window="24h")  # fmt: skip
    done, _ = wait_for(client, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed", done.errors
    outputs, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"doc-{i}" for i in range(8)]
    body = outputs[0]["response"]["body"]
    assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 384 and body["usage"]["prompt_tokens"] > 0
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("empty", "missing_input")]
    assert done.request_counts.model_dump() == {"total": 9, "completed": 8, "failed": 1}


def test_a_small_batch_created_after_a_large_one_completes_first(tmp_path):
    """Two tenants on a server that runs two batches at once on the one engine it started
    (`--shared-engine`), small batches first there (`--shortest-batch-first`): a 10-line batch
    (of /v1/responses lines) created while a 3,000-line chat batch runs is completed before it —
    as OpenAI and llm-d's gateway interleave tenants — and every row of both is answered or
    cancelled once; both batches' runs sent their rows to that one engine, whose processes (API
    server, engine core, worker) end with the server even when it is SIGKILLed. Each batch's end
    reaches the operator's webhook, signed: the official client's `webhooks.unwrap` takes it with
    the secret."""
    import base64

    from harness import WebhookReceiver
    from openai.types.responses import Response

    secret = "whsec_" + base64.b64encode(uuid.uuid4().bytes).decode()
    receiver = WebhookReceiver()
    env = {"NIGHTSHIFT_WEBHOOK_SECRET": secret, "VLLM_CPU_KVCACHE_SPACE": "0.25"}  # the engine's KV: 256 MiB
    running = Server(tmp_path / "api", "--shared-engine", "--max-running-batches", "2", "--shortest-batch-first",
                     "--webhook-url", receiver.url, logs=tmp_path, env=env).start(listen_s=300)  # fmt: skip
    try:
        large_client, small_client = running.client(KEYS[0]), running.client(KEYS[1])
        rows = long_requests(3000, tokens=128)
        large = large_client.batches.create(input_file_id=upload(large_client, rows),
                                            endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip
        wait_for(large_client, large.id, lambda b: b.request_counts.completed > 0)
        ask = {"instructions": "Be brief.", "max_output_tokens": 16}
        few = [{"custom_id": f"few-{i}", "method": "POST", "url": "/v1/responses",
                "body": {"input": f"Say {i}.", **ask}} for i in range(10)]  # fmt: skip
        small = small_client.batches.create(input_file_id=upload(small_client, few),
                                            endpoint="/v1/responses", completion_window="24h")  # fmt: skip
        small_done, _ = wait_for(small_client, small.id, lambda b: b.status in TERMINAL)
        large_then = large_client.batches.retrieve(large.id)
        answered = lines_of(small_client, small_done.output_file_id)
        print(f"small {small_done.status} at +{small_done.completed_at - small.created_at} s; large {large_then.status}"
              f" with {large_then.request_counts.completed} of {len(rows)} rows done")  # fmt: skip
        large_client.batches.cancel(large.id)
        cancelled, _ = wait_for(large_client, large.id, lambda b: b.status in TERMINAL)
        outputs, errors = (
            lines_of(large_client, cancelled.output_file_id),
            lines_of(large_client, cancelled.error_file_id),
        )
        deadline = time.monotonic() + 60
        while len(receiver.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        batches = tmp_path / "api" / "batches"
        engines = {JobSpec.load(batches / b.id / "job.json").engine.engine_url for b in (large, small)}
        assert len(engines) == 1 and next(iter(engines)).startswith("http://127.0.0.1:"), f"one engine: {engines}"
        engine_group = _group_listening_on(int(next(iter(engines)).rsplit(":", 1)[1].split("/")[0]))
        assert len(_processes_of(engine_group)) >= 2, "vLLM's API server and its engine core"
        running.kill()  # SIGKILL: serve cannot stop its engine itself
    finally:
        running.stop()
        receiver.close()
    deadline = time.monotonic() + 30
    while _processes_of(engine_group) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _processes_of(engine_group), "the shared engine's processes outlived their server's SIGKILL"

    assert small_done.status == "completed" and small_done.request_counts.completed == len(few)
    assert large_then.status == "in_progress", "the small batch waited for the large one"
    assert sorted(line["custom_id"] for line in answered) == sorted(row["custom_id"] for row in few)
    for line in answered:  # the small batch is a Responses API batch: each answer a Response object
        response = Response.model_validate(line["response"]["body"])
        assert response.instructions == "Be brief." and response.usage.output_tokens > 0 and response.output
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(row["custom_id"] for row in rows)
    events = [large_client.webhooks.unwrap(body, headers, secret=secret) for headers, body in receiver.requests]
    assert {event.data.id: event.type for event in events} == {small.id: "batch.completed", large.id: "batch.cancelled"}
