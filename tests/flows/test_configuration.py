"""Specification of engine defaults taken from the model, and of configuration errors: said once,
in one line, with exit status 2, before any row is planned or any engine loads."""

import json
import shutil
import time

import pytest
from conftest import chat_request, write_jsonl
from harness import run_cli


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The tiny model with a 1,024-token context."""
    from nightshift.models import provision

    source = provision(("tiny",))["tiny"]
    target = tmp_path_factory.mktemp("models") / "tiny-1k"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (target / "config.json").write_text(json.dumps(config))
    return target


def cli(*args):
    from nightshift.cli import main

    return main(
        ["run", *map(str, args), "--served-model-name", "tiny", "--oracle-samples", "0", "--determinism-samples", "0"]
    )


def test_with_no_max_model_len_the_engine_runs_with_the_models_own_context(
    tmp_path, short_context_model, prefect_server
):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [chat_request(f"r{i}", f"Clause {i}") for i in range(3)] + [chat_request("too-long", "word " * 1100)],
    )
    assert cli(path, "--output", tmp_path / "run", "--model", short_context_model) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["max_model_len"] == 1024 and "1,024 tokens" in (tmp_path / "run" / "report.md").read_text()
    errors = [json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("too-long", "context_length_exceeded")]


def test_a_context_longer_than_the_models_exits_2_in_one_line_before_anything_runs(
    tmp_path, short_context_model, capsys
):
    from nightshift.engine import local as engine

    path = write_jsonl(tmp_path / "in.jsonl", [chat_request("r0", "Clause")])
    started = time.monotonic()
    code = cli(path, "--output", tmp_path / "run", "--model", short_context_model, "--max-model-len", "4096")
    elapsed = time.monotonic() - started
    message = capsys.readouterr().err.strip()
    assert code == 2
    assert len(message.splitlines()) == 1 and "4096" in message and "1024" in message, message
    assert not (tmp_path / "run" / "plan").exists()  # stopped before planning
    for loaded in (engine.ENGINES.engine, engine.ENGINES.start):  # no engine ever got the refused configuration
        assert loaded is None or loaded.config.max_model_len != 4096
    assert elapsed < 30


@pytest.mark.parametrize(
    "args, words",
    [
        (["--dtype-is-not-an-option"], None),
        (["--model", "/no/such/model"], "does not exist"),
    ],
)
def test_other_configuration_errors_exit_2_with_a_clear_message(tmp_path, capsys, args, words):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_request("r0", "Clause")])
    if words is None:  # argparse's own refusal of an unknown option
        with pytest.raises(SystemExit) as exit_:
            cli(path, "--output", tmp_path / "run", *args)
        assert exit_.value.code == 2
        return
    assert cli(path, "--output", tmp_path / "run", *args) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["weights cut short", "no tokenizer", "config.json that does not parse"])
def test_a_model_that_cannot_load_exits_2_in_one_line_naming_the_file_before_anything_runs(tmp_path, capsys, damage):
    from nightshift.models import model_dir

    model = shutil.copytree(model_dir("tiny"), tmp_path / "damaged")
    if damage == "weights cut short":
        damaged = model / "model.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:100_000])
    elif damage == "no tokenizer":
        damaged = model
        (model / "tokenizer.json").unlink()
    else:
        damaged = model / "config.json"
        damaged.write_text(damaged.read_text()[:40])
    path = write_jsonl(tmp_path / "in.jsonl", [chat_request("r0", "Clause")])

    code = cli(path, "--output", tmp_path / "run", "--model", model)

    message = capsys.readouterr().err.strip()
    assert code == 2
    assert len(message.splitlines()) == 1 and str(damaged) in message, message
    assert not (tmp_path / "run" / "plan").exists()  # stopped before planning


def test_an_engine_that_cannot_start_is_said_once_with_its_memory_picture_and_not_retried(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_request(f"r{i}", f"Clause {i}") for i in range(3)])
    done = run_cli(
        "run", path, "--output", tmp_path / "run", "--model", "tiny",
        "--verbose",  # the engine's own log lines: how many times it started
        env={"VLLM_CPU_KVCACHE_SPACE": "100000"},  # more KV cache than any machine here holds
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    last = [line for line in done.stderr.splitlines() if line.startswith("nightshift:")][-1]
    assert "the engine could not start" in last and "memory free" in last and "100000.0 GiB" in last
    assert output.count("Initializing a V1 LLM engine") == 1  # started once: no Prefect retries, no second try


def test_fanning_out_to_a_deployment_the_server_lacks_fails_before_anything_is_planned(tmp_path, prefect_server):
    from nightshift.config import FanOut
    from nightshift.errors import ConfigurationError
    from nightshift.flows.batch import batch_inference
    from nightshift.jobs import make_job

    path = write_jsonl(tmp_path / "in.jsonl", [chat_request("r0", "Clause")])
    fan_out = FanOut(deployment="nightshift-generate-shards/never-deployed")
    with pytest.raises(ConfigurationError, match="never-deployed.*scripts/deploy.sh"):
        batch_inference(str(path), str(tmp_path / "run"), job=make_job("tiny"), fan_out=fan_out)
    assert not (tmp_path / "run" / "plan").exists()
