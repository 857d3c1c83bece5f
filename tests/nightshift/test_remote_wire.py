"""The engine server's wire, without a server: which of its models is the job's, what its
answers become in the output line, and that a URL's credentials never reach a log."""

import pytest

from nightshift.config import EngineConfig
from nightshift.engine.remote import _the_model, displayed
from nightshift.errors import ConfigurationError
from nightshift.wire.openai_format import RemoteCompletion, remote_output_line

pytestmark = pytest.mark.fast


def test_a_urls_user_and_password_never_reach_a_log_or_report():
    assert displayed("http://bob:s3cr3t@gpu-7.internal:8000/v1") == "http://gpu-7.internal:8000/v1"
    assert displayed("https://fleet.example/v1?token=abc") == "https://fleet.example/v1"


def test_the_jobs_model_is_the_one_the_server_serves_or_the_one_named_like_it():
    config = EngineConfig(model="/models/Llama-3.1-8B-Instruct", engine_url="http://x/v1")
    assert _the_model([{"id": "whatever-name", "max_model_len": 8192}], config, "u") == ("whatever-name", 8192)
    served = [{"id": "qwen", "max_model_len": 4096}, {"id": "Llama-3.1-8B-Instruct", "max_model_len": 131072}]
    assert _the_model(served, config, "u") == ("Llama-3.1-8B-Instruct", 131072)
    with pytest.raises(ConfigurationError, match="serves qwen, mistral, none of them 'Llama-3.1-8B-Instruct'"):
        _the_model([{"id": "qwen"}, {"id": "mistral"}], config, "u")


def test_a_servers_answer_keeps_its_body_under_the_runs_ids_without_the_token_ids_it_was_asked_for():
    body = {
        "id": "chatcmpl-server-1",
        "object": "chat.completion",
        "model": "served-as",
        "prompt_token_ids": [1, 2, 3],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop",
                     "token_ids": [7, 8], "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                  "prompt_tokens_details": {"cached_tokens": 2}},
    }  # fmt: skip
    answer = RemoteCompletion(body, "chat")
    assert answer.outputs[0].text == "hi" and answer.outputs[0].token_ids == [7, 8]
    assert answer.num_cached_tokens == 2 and answer.prompt_token_ids == [1, 2, 3]
    line = remote_output_line("row-1", "chat", answer, "my-model", "cache-key").wire()
    out = line["response"]["body"]
    assert out["model"] == "my-model" and out["id"].startswith("chatcmpl-") and out["id"] != body["id"]
    assert "prompt_token_ids" not in out and "token_ids" not in out["choices"][0]
    assert out["usage"]["prompt_tokens"] == 3 and line["custom_id"] == "row-1"
    again = remote_output_line("row-1", "chat", answer, "my-model", "cache-key").wire()
    assert again["id"] == line["id"], "the same row in the same job gets the same id on every run"


def test_a_server_that_says_no_usage_still_gives_a_line_with_zero_tokens():
    answer = RemoteCompletion({"choices": [{"index": 0, "text": "once", "finish_reason": "length"}]}, "completion")
    assert answer.outputs[0].text == "once"
    assert answer.body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_a_fleets_shard_groups_spread_over_its_servers_each_group_the_same_way_every_time():
    fleet = EngineConfig(model="m", engine_url="http://a:8000/v1/, http://b:8000/v1,http://c:8000/v1")
    assert fleet.engine_urls == ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]
    firsts = [fleet.spread_over_servers(f"group-{i}").engine_urls[0] for i in range(60)]
    assert set(firsts) == set(fleet.engine_urls), "every server gets groups"
    assert max(firsts.count(url) for url in fleet.engine_urls) < 30, firsts
    again = fleet.spread_over_servers("group-7")
    assert again == fleet.spread_over_servers("group-7"), "an attempt starts where the last one did"
    assert sorted(again.engine_urls) == fleet.engine_urls, "the others stay to fall back on"
    one = EngineConfig(model="m", engine_url="http://a:8000/v1")
    assert one.spread_over_servers("group-7") is one


@pytest.mark.parametrize(
    "url, why",
    [
        ("gpu-7:8000/v1", "not an http"),
        ("ftp://gpu-7/v1", "not an http"),
        (" , ", "not an http"),
        ("http://bob:s3cr3t@gpu-7:8000/v1", "user or password"),
        ("http://a/v1,https://token@b/v1", "user or password"),
    ],
)
def test_an_engine_url_that_is_no_url_or_carries_a_secret_is_refused_before_anything_runs(url, why):
    with pytest.raises(ValueError, match=why):
        EngineConfig(model="m", engine_url=url)
