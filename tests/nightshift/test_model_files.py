"""Specification of the model check before a run: a model directory that cannot load — weights
cut short, no tokenizer, a config that does not parse, an index naming absent shards — is said
in one line naming the file, before anything is planned; a whole one passes."""

import json
import shutil

import pytest

from nightshift.models import model_dir, model_files_problem

pytestmark = pytest.mark.fast


@pytest.fixture
def tiny_copy(tmp_path):
    return shutil.copytree(model_dir("tiny"), tmp_path / "tiny")


@pytest.mark.parametrize("bundled", ["tiny", "smollm2", "minilm"])
def test_the_bundled_models_are_whole(bundled):
    assert model_files_problem(model_dir(bundled)) is None


def test_weights_cut_short_are_named_with_the_bytes_there_and_the_bytes_the_header_describes(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    whole = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(whole // 2)
    problem = model_files_problem(tiny_copy)
    assert str(weights) in problem and "cut short" in problem
    assert f"{whole // 2:,} bytes of the {whole:,}" in problem


def test_a_weight_file_with_no_whole_header_or_nothing_in_it_is_named(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(b"\x10\x00")
    assert "no whole header" in model_files_problem(tiny_copy)
    weights.write_bytes(b"")
    assert str(weights) in model_files_problem(tiny_copy)


def test_no_tokenizer_beside_the_weights_is_said_with_the_files_looked_for(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    problem = model_files_problem(tiny_copy)
    assert problem.startswith(f"no tokenizer in {tiny_copy}") and "tokenizer.model" in problem
    (tiny_copy / "tokenizer.model").write_bytes(b"a sentencepiece model")  # any one tokenizer will do
    assert model_files_problem(tiny_copy) is None


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_json_file_a_loader_reads_that_does_not_parse_is_named(tiny_copy, name):
    text = (tiny_copy / name).read_text()
    (tiny_copy / name).write_text(text[: len(text) // 2])
    problem = model_files_problem(tiny_copy)
    assert str(tiny_copy / name) in problem and "does not parse" in problem


def test_no_config_no_weights_and_an_index_naming_absent_shards_are_each_said(tiny_copy):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00001-of-00002.safetensors" in model_files_problem(tiny_copy)
    (tiny_copy / "model.safetensors.index.json").unlink()
    (tiny_copy / "model.safetensors").unlink()
    assert model_files_problem(tiny_copy).startswith("no weight files")
    (tiny_copy / "config.json").unlink()
    assert model_files_problem(tiny_copy) == f"no config.json in {tiny_copy}"


def test_nightshift_plan_says_it_in_one_line_and_exits_2(tiny_copy, tmp_path, capsys):
    from conftest import chat_request, write_jsonl

    from nightshift.cli import main

    (tiny_copy / "tokenizer.json").unlink()
    requests = write_jsonl(tmp_path / "in.jsonl", [chat_request("r0", "Clause")])
    assert main(["plan", str(requests), "--model", str(tiny_copy)]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"nightshift: model '{tiny_copy}' cannot load: no tokenizer")
