"""Specification of `--engine-url`: the rows answered by a real OpenAI-compatible server — vLLM's
own (`python -m vllm.entrypoints.openai.api_server`, the tiny model, priority scheduling) — with
every guarantee of an in-process run: every row once, per-row errors in the server's words, usage
tokens in the report, validation through the server; a server that is busy (429, 503, dropped
connections), killed and restarted, or gone for good loses no row."""

from __future__ import annotations

import base64
import json
import subprocess
import time

import numpy as np
import pytest
from conftest import chat_request, read_jsonl, write_jsonl
from fault_proxy import FaultyEngineProxy
from harness import EngineServer, free_port, run_cli, start_cli


@pytest.fixture
def engine_server(warm_engine):
    """The session's warm engine server (conftest): these tests' subject is the client side."""
    return warm_engine


@pytest.fixture
def own_engine_server(tmp_path_factory):
    """A server of the test's own, which it kills (and the drill restarts)."""
    server = EngineServer(tmp_path_factory.mktemp("engine-server")).start()
    yield server
    if server.process.poll() is None:
        server.kill()


def questions(count: int, tokens: int = 12) -> list[dict]:
    return [chat_request(f"q-{i:03d}", f"Tell me about topic {i}.", max_tokens=tokens) for i in range(count)]


def texts(run_dir) -> dict[str, str]:
    choices = {
        line["custom_id"]: line["response"]["body"]["choices"][0] for line in read_jsonl(run_dir / "output.jsonl")
    }
    return {custom_id: (c.get("message") or {}).get("content", c.get("text")) for custom_id, c in choices.items()}


def assert_every_row_once(run_dir, rows: list[dict]) -> None:
    answered = [
        line["custom_id"] for line in read_jsonl(run_dir / "output.jsonl") + read_jsonl(run_dir / "errors.jsonl")
    ]
    assert sorted(answered) == sorted(row["custom_id"] for row in rows)


def test_a_batch_through_an_engine_server_is_answered_as_the_in_process_engine_answers_it(engine_server, tmp_path):
    rows = questions(30)
    rows += [
        chat_request("too-long", "word " * 3000),
        chat_request("bad-type", "Hello", temperature="hot"),
        chat_request("logprobs", "Hello", max_tokens=3, logprobs=True, top_logprobs=2),
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}},
    ]  # fmt: skip
    batch = write_jsonl(tmp_path / "in.jsonl", rows)

    remote = run_cli("run", batch, "--output", tmp_path / "remote", "--model", "tiny",
                     "--engine-url", engine_server.url, "--engine-priority", "5")  # fmt: skip
    local = run_cli("run", batch, "--output", tmp_path / "local", "--model", "tiny")

    assert remote.returncode == 0, remote.stderr[-3000:]
    assert local.returncode == 0, local.stderr[-3000:]
    assert_every_row_once(tmp_path / "remote", rows)
    remote_texts, local_texts = texts(tmp_path / "remote"), texts(tmp_path / "local")
    assert sorted(remote_texts) == sorted(local_texts)
    # Greedy rows: the same model answers the same. vLLM is not batch-invariant (a server batches
    # rows otherwise than an offline engine), so a near-tie token may flip in one row, not more.
    assert sum(remote_texts[k] != local_texts[k] for k in remote_texts) <= 1, (remote_texts, local_texts)
    errors = {e["custom_id"]: e["error"] for e in read_jsonl(tmp_path / "remote" / "errors.jsonl")}
    assert errors["too-long"]["code"] == "context_length_exceeded" and "2048" in errors["too-long"]["message"]
    assert errors["bad-type"]["code"] == "invalid_request"
    outputs = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(tmp_path / "remote" / "output.jsonl")}
    assert outputs["logprobs"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"], "the server's logprobs"
    assert outputs["completion"]["object"] == "text_completion" and outputs["completion"]["model"] == "tiny"
    assert "token_ids" not in outputs["q-000"]["choices"][0], "OpenAI's shape: no vLLM extras asked for"

    report = json.loads((tmp_path / "remote" / "report.json").read_text())
    local_report = json.loads((tmp_path / "local" / "report.json").read_text())
    assert (report["prompt_tokens"], report["completion_tokens"]) == (
        local_report["prompt_tokens"],
        local_report["completion_tokens"],
    ), "usage tokens as the server counted them"
    assert report["engine_settings"]["engine"] == "remote" and report["engine_settings"]["priority"] == 5
    verdict = json.loads((tmp_path / "remote" / "validation.json").read_text())
    assert verdict["validated"] and verdict["checks"]["oracle"]["agreement"] == 1.0, verdict
    assert verdict["checks"]["determinism"]["same"] == verdict["checks"]["determinism"]["of"] > 0
    assert "engine ready" in remote.stdout + remote.stderr


def test_a_busy_server_429_503_and_dropped_connections_costs_no_row(engine_server, tmp_path):
    rows = questions(240, tokens=24)
    with FaultyEngineProxy(engine_server.url.removesuffix("/v1"), fault_rate=0.25, stall_s=0.5) as proxy:
        done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model",
                       "tiny", "--engine-url", f"{proxy.endpoint}/v1", "--oracle-samples", "0",
                       "--online-ttft-slo-ms", "500", "--engine-max-concurrency", "32")  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_row_once(tmp_path / "run", rows)
    assert read_jsonl(tmp_path / "run" / "errors.jsonl") == [], "a busy server is no row's fault"
    assert proxy.counts["throttle"] and proxy.counts["internal"] and proxy.counts["drop"], proxy.counts
    # The politeness controller probed the online TTFT all along and kept its limit within the cap.
    politeness = json.loads((tmp_path / "run" / "report.json").read_text())["politeness"]
    assert politeness["objective_ms"] == 500 and politeness["looks"] >= 1
    assert 1 <= politeness["in_flight_min"] <= politeness["in_flight_max"] <= 32
    assert "Shared with online traffic" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.drill
def test_a_server_killed_mid_run_and_restarted_or_gone_for_good_loses_no_row(own_engine_server, tmp_path):
    """A drill (`make drills`): it waits out a server's restart by design. The suite proves the
    parts faster: 429s, 503s and dropped connections cost no row, and a fleet passes over a
    server that does not answer (the tests beside this one)."""
    rows = questions(600, tokens=32)
    batch = write_jsonl(tmp_path / "in.jsonl", rows)

    def run(run_dir, *extra):
        return start_cli("run", batch, "--output", run_dir, "--model", "tiny", "--engine-url", own_engine_server.url,
                         "--chunk-size", "16", "--oracle-samples", "0", "--determinism-samples", "0", *extra,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def killed_once_chunks_are_written(run_dir, process):
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("shards/*/chunk-*.parquet")):
            assert time.monotonic() < deadline and process.poll() is None, "no chunk was written"
            time.sleep(0.2)
        own_engine_server.kill()

    # Restarted within the window: the run waits, retrying, and finishes.
    first = run(tmp_path / "restarted")
    killed_once_chunks_are_written(tmp_path / "restarted", first)
    time.sleep(3)
    own_engine_server.start()
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    assert_every_row_once(tmp_path / "restarted", rows)
    assert read_jsonl(tmp_path / "restarted" / "errors.jsonl") == []

    # Gone for longer than the window: exit 75, the finished rows kept, and a rerun resumes.
    gone = tmp_path / "gone"
    second = run(gone, "--engine-unreachable-s", "5")
    killed_once_chunks_are_written(gone, second)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 75, output[-3000:]
    assert "has not answered for" in output and "run again to resume" in output
    assert not (gone / "output.jsonl").exists()
    kept = {path: path.stat().st_mtime_ns for path in gone.glob("shards/*/chunk-*.parquet")}
    assert kept
    own_engine_server.start()
    third = run(gone)
    output, _ = third.communicate(timeout=600)
    assert third.returncode == 0, output[-3000:]
    assert_every_row_once(gone, rows)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items()), "finished chunks are not redone"


def test_a_fleet_moves_to_its_live_server_when_its_server_dies_mid_run(own_engine_server, engine_server, tmp_path):
    """Two real servers of the tiny model; the run starts on the first, which is killed once chunks
    are written: the rows in flight and the rest go to the second — exit 0, every row once, none
    an error line — and the run's log says where they went."""
    rows = questions(300, tokens=24)
    run_dir = tmp_path / "run"
    process = start_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", run_dir, "--model", "tiny",
                        "--engine-url", f"{own_engine_server.url},{engine_server.url}", "--chunk-size", "16",
                        "--oracle-samples", "0", "--determinism-samples", "0",
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("shards/*/chunk-*.parquet")):
        assert time.monotonic() < deadline and process.poll() is None, "no chunk was written"
        time.sleep(0.2)
    own_engine_server.kill()
    output, _ = process.communicate(timeout=600)

    assert process.returncode == 0, output[-3000:]
    assert_every_row_once(run_dir, rows)
    assert read_jsonl(run_dir / "errors.jsonl") == []
    assert f"the engine server at {own_engine_server.url} stopped answering" in output
    assert f"its rows go to {engine_server.url} now" in output


def test_a_fleet_passes_over_a_server_that_does_not_answer(engine_server, tmp_path):
    rows = questions(20)
    gone = f"http://127.0.0.1:{free_port()}/v1"

    done = run_cli("run", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "run", "--model", "tiny",
                   "--engine-url", f"{gone},{engine_server.url}", "--oracle-samples", "0")  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_row_once(tmp_path / "run", rows)
    assert read_jsonl(tmp_path / "run" / "errors.jsonl") == []
    assert f"passed over: {gone}" in done.stdout + done.stderr
    settings = json.loads((tmp_path / "run" / "report.json").read_text())["engine_settings"]
    assert settings["engine_url"] == engine_server.url and settings["fleet"] == [gone, engine_server.url]


EMBEDDING_SERVER_KEY = "engine-key-for-the-suite"


def embedding_line(custom_id: str, text, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "minilm", "input": text, **body}}  # fmt: skip


def test_an_embeddings_batch_through_a_keyed_server_with_its_key_in_a_secret_block(tmp_path):
    from prefect.blocks.system import Secret

    server = EngineServer(tmp_path, "minilm", "--api-key", EMBEDDING_SERVER_KEY).start()
    try:
        Secret(value=EMBEDDING_SERVER_KEY).save("nightshift-test-engine-key", overwrite=True)
        rows = [embedding_line(f"doc-{i:02d}", f"Document {i} is about {['cats', 'tea', 'rain'][i % 3]}.")
                for i in range(24)]  # fmt: skip
        rows += [
            embedding_line("as-base64", ["Document 0 is about cats.", "two inputs"], encoding_format="base64"),
            embedding_line("too-long", "word " * 600),
            embedding_line("empty", ""),
        ]
        batch = write_jsonl(tmp_path / "in.jsonl", rows)
        without_key = {"NIGHTSHIFT_ENGINE_API_KEY": ""}

        wrong = run_cli("run", batch, "--output", tmp_path / "wrong", "--model", "minilm", "--engine-url",
                        server.url, env={"NIGHTSHIFT_ENGINE_API_KEY": "not-the-key"})  # fmt: skip
        done = run_cli("run", batch, "--output", tmp_path / "run", "--model", "minilm", "--engine-url", server.url,
                       "--engine-api-key-secret", "nightshift-test-engine-key", env=without_key)  # fmt: skip
    finally:
        server.kill()

    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert "refused the key (401" in wrong.stderr and "not-the-key" not in wrong.stdout + wrong.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_row_once(tmp_path / "run", rows)
    errors = {e["custom_id"]: e["error"]["code"] for e in read_jsonl(tmp_path / "run" / "errors.jsonl")}
    assert errors == {"too-long": "context_length_exceeded", "empty": "missing_input"}
    bodies = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(tmp_path / "run" / "output.jsonl")}
    assert bodies["doc-00"]["object"] == "list" and bodies["doc-00"]["usage"]["prompt_tokens"] > 0
    encoded = bodies["as-base64"]["data"][0]["embedding"]
    as_floats = np.frombuffer(base64.b64decode(encoded), dtype=np.float32)
    assert np.allclose(as_floats, bodies["doc-00"]["data"][0]["embedding"], atol=1e-5), "the row's own encoding"
    assert len(bodies["as-base64"]["data"]) == 2
    # The canary stage scores the server's vectors against transformers on the model's weights.
    verdict = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert verdict["validated"] and verdict["checks"]["embedding_oracle"]["min_cosine"] >= 0.999, verdict
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["engine_settings"]["runner"] == "pooling" and report["prompt_tokens"] > 0
    for path in tmp_path.glob("run/**/*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".log"):
            assert EMBEDDING_SERVER_KEY not in path.read_text(errors="replace"), path
