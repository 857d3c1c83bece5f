"""`nightshift serve` attacked as a hostile key holder would (docs/security.md): a live server
whose rows go to a recording engine server, a loopback listener that must receive nothing and a
secret file that must never reach the engine — run through scripts/probe_serve_security.py,
which anyone can point at their own server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
from harness import REPO
from stub_engine import StubEngine
from test_batch_api import KEYS, TERMINAL, Server, upload, wait_for

MAX_FILE_BYTES = 300_000


@pytest.fixture(scope="module")
def stub():
    engine = StubEngine("tiny")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, stub):
    """A server with the defaults a stranger meets: no media root or URL opened; its rows go to
    the recording engine server; a row's own priority honoured no earlier than 10."""
    root = tmp_path_factory.mktemp("guarded")
    server = Server(
        root / "api", "--chat-engine-url", stub.url, "--max-file-bytes", str(MAX_FILE_BYTES),
        "--row-priority-floor", "10", logs=root,
        env={"NIGHTSHIFT_ENGINE_API_KEY": "engine-key-never-for-tenants",
             "NIGHTSHIFT_WEBHOOK_SECRET": "whsec-never-for-tenants"},
    ).start()  # fmt: skip
    yield server
    server.stop()


def test_every_attack_of_the_probe_is_refused_and_nothing_secret_reaches_the_engine(guarded, stub):
    probe = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "probe_serve_security.py"), "--base-url",
         f"http://127.0.0.1:{guarded.port}/v1", "--key", KEYS[0], "--other-key", KEYS[1],
         "--max-file-bytes", str(MAX_FILE_BYTES), "--timeout", "300", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    outcomes = json.loads(probe.stdout)
    open_ = [o for o in outcomes if not o["held"]]
    assert not open_ and probe.returncode == 0, json.dumps(open_, indent=1) + probe.stderr[-2000:]
    assert len(outcomes) >= 20
    sent = stub.received()
    assert b"nightshift-probe-secret" not in sent and b"root:x:0" not in sent
    urls = [
        part["image_url"]["url"]
        for body in stub.chat_bodies() for message in body["messages"] if isinstance(message["content"], list)
        for part in message["content"] if part.get("type") == "image_url"
    ]  # fmt: skip
    assert urls and all(url.startswith("data:image/png;base64,") for url in urls), "the engine read no source itself"


def test_a_rows_own_priority_never_jumps_the_operators_floor(guarded, stub):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    inline = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    rows = []
    for custom_id, priority in (("jump-ahead", -100), ("behind", 50)):
        content = [{"type": "text", "text": custom_id}, {"type": "image_url", "image_url": {"url": inline}}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "priority": priority}
        rows.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    client = guarded.client(KEYS[2])
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    finished, _ = wait_for(client, batch.id, lambda b: b.status in TERMINAL)
    assert finished.status == "completed", finished.errors
    sent = {b["messages"][0]["content"][0]["text"]: b.get("priority") for b in stub.chat_bodies()}
    assert sent["jump-ahead"] == 10 and sent["behind"] == 50


def test_a_run_never_inherits_the_tenants_keys(guarded):
    """The batch's run process (found by its command line) holds no API key of the server's, nor
    its webhooks' signing secret."""
    import psutil

    client = guarded.client(KEYS[3])
    rows = [{"custom_id": f"slow-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}} for i in range(3)]  # fmt: skip
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    environments = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not environments:
        for process in psutil.process_iter(["cmdline"]):
            if batch.id in " ".join(process.info["cmdline"] or []):
                try:
                    environments.append(process.environ())
                except psutil.Error:
                    continue
        time.sleep(0.2)
    wait_for(client, batch.id, lambda b: b.status in TERMINAL)
    assert environments, "the batch's run was never seen"
    for environment in environments:
        assert "NIGHTSHIFT_API_KEYS" not in environment and "NIGHTSHIFT_WEBHOOK_SECRET" not in environment
        assert environment.get("NIGHTSHIFT_ENGINE_API_KEY") == "engine-key-never-for-tenants"  # it talks to one
