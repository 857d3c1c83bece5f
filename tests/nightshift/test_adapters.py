"""Specification of LoRA adapters and tool calls as configuration and wire format: without an
engine (tests/flows/test_adapters_and_tools.py runs them on the real one)."""

import base64
import json

import pytest

from nightshift.errors import ConfigurationError
from nightshift.wire.openai_format import RequestRejected, ServedModels

pytestmark = pytest.mark.fast


def fake_adapter(path, weights: bytes = b"weights", rank: int = 8):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_adapters_are_given_as_name_equals_path_and_each_name_once(tmp_path):
    from nightshift.jobs import make_job

    job = make_job("tiny", lora=[f"support={fake_adapter(tmp_path / 'a')}", f"legal={fake_adapter(tmp_path / 'b')}"])
    assert [a.name for a in job.engine.lora] == ["support", "legal"]
    assert all(a.identity and a.path.startswith("/") for a in job.engine.lora)
    for given, problem in [
        (["support"], "NAME=PATH"),
        ([f"x={tmp_path / 'a'}", f"x={tmp_path / 'b'}"], "named alike"),
        ([f"tiny={tmp_path / 'a'}"], "like the base model"),
        ([f"x={tmp_path / 'missing'}"], "not a directory"),
    ]:
        with pytest.raises(ConfigurationError, match=problem):
            make_job("tiny", lora=given)
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "adapter_config.json").write_text("{")
    with pytest.raises(ConfigurationError, match="adapter_model"):
        make_job("tiny", lora=[f"x={tmp_path / 'no-weights'}"])


def test_an_adapters_weights_are_part_of_every_shards_identity_and_a_changed_adapter_is_refused(tmp_path):
    from nightshift.engine.lora import local_adapter
    from nightshift.jobs import make_job
    from nightshift.records import Shard
    from nightshift.stages.chunks import shard_cache_key

    adapter = fake_adapter(tmp_path / "a")
    before = make_job("tiny", lora=[f"support={adapter}"])
    shard = Shard(index=0, path="s.parquet", num_rows=1, first_row=0, content_hash="c" * 64)
    assert make_job("tiny").fingerprint() != before.fingerprint()
    fake_adapter(adapter, b"other weights")
    after = make_job("tiny", lora=[f"support={adapter}"])
    assert after.output_fingerprint() != before.output_fingerprint()  # the result cache's key
    assert shard_cache_key(shard, after) != shard_cache_key(shard, before)  # the checkpoints'
    with pytest.raises(ConfigurationError, match="changed since this job was made"):
        local_adapter(before.engine.lora[0])


def test_the_engine_takes_the_smallest_lora_rank_that_holds_every_adapter(tmp_path):
    from nightshift.engine.lora import engine_lora_rank

    assert engine_lora_rank([str(fake_adapter(tmp_path / "a", rank=4))]) == 8
    assert (
        engine_lora_rank([str(fake_adapter(tmp_path / "b", rank=8)), str(fake_adapter(tmp_path / "c", rank=24))]) == 32
    )
    with pytest.raises(ConfigurationError, match="ranks up to"):
        engine_lora_rank([str(fake_adapter(tmp_path / "d", rank=1024))])


def test_a_rows_model_picks_the_base_model_or_an_adapter_and_anything_else_is_model_not_found():
    models = ServedModels("tiny", frozenset({"tiny", "/models/tiny"}), frozenset({"support", "legal"}))
    assert models.adapter_for(None) is None and models.adapter_for("/models/tiny") is None
    assert models.adapter_for("legal") == "legal"
    with pytest.raises(RequestRejected) as refused:
        models.adapter_for("marketing")
    assert refused.value.code == "model_not_found" and "'legal'" in str(refused.value)
    lenient = ServedModels("tiny", frozenset({"tiny"}), frozenset({"legal"}), mismatch="ignore")
    assert lenient.adapter_for("marketing") is None and lenient.adapter_for("legal") == "legal"


def test_the_tool_call_parser_follows_the_chat_templates_family_unless_named():
    from nightshift.engine.tool_calls import FALLBACK_PARSER, parser_for

    assert parser_for("auto", "{% if tools %}<tool_call>{{ tools }}</tool_call>{% endif %}") == "hermes"
    assert parser_for("auto", "... <|python_tag|> ...") == "llama3_json"
    assert parser_for("auto", "[AVAILABLE_TOOLS] [TOOL_CALLS]") == "mistral"
    assert parser_for("auto", None) == FALLBACK_PARSER
    assert parser_for("qwen3_xml", "<tool_call>") == "qwen3_xml"


def test_forced_calls_become_openai_tool_calls_with_stable_ids():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from nightshift.engine.tool_calls import ToolCalling, constrain

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    calling = ToolCalling(None, tokenizer=None)

    def request(tool_choice):
        body = {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": tool_choice}
        parsed = ChatCompletionRequest.model_validate(body)
        constrain(parsed)
        return parsed

    named = request({"type": "function", "function": {"name": "f"}})
    assert named.structured_outputs.grammar  # decoded under the function's schema
    message, finish = calling.message('{"a":1}', named, "rid-0", "stop")
    assert message["content"] is None and finish == "stop"
    assert message["tool_calls"] == [
        {"id": message["tool_calls"][0]["id"], "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert calling.message('{"a":1}', named, "rid-0", "stop")[0] == message  # a re-run writes the same bytes
    required = request("required")
    message, finish = calling.message('[{"name":"f","parameters":{"b":2}}]', required, "rid-1", "stop")
    assert finish == "tool_calls" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"b": 2}
    message, finish = calling.message('[{"name":"f","param', required, "rid-2", "length")  # cut short: text kept
    assert "tool_calls" not in message and message["content"].startswith("[{") and finish == "length"


def test_image_parts_are_read_checked_and_sent_as_data_urls(tmp_path):
    import base64
    import io

    from PIL import Image

    from nightshift.wire.images import checked_images, with_images_resolved
    from nightshift.wire.media import MediaPolicy

    trusted = MediaPolicy(trusted=True)  # the operator's own run: its paths are read

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())

    def conversation(url):
        return [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ]

    assert checked_images(conversation(str(tmp_path / "a.png")), trusted) == 1  # found; read when the engine admits it
    with pytest.raises(RequestRejected, match="cannot be read"):
        checked_images(conversation(str(tmp_path / "missing.png")), trusted)
    messages, count = with_images_resolved(conversation(str(tmp_path / "a.png")), trusted)
    url = messages[0]["content"][1]["image_url"]["url"]
    assert count == 1 and url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == buffer.getvalue()
    assert with_images_resolved(conversation("https://example.com/a.png"), trusted)[0][0]["content"][1]["image_url"][
        "url"
    ] == ("https://example.com/a.png")  # the engine fetches those
    for url, problem in [
        ("data:image/png;base64,not base64!", "does not decode"),
        ("data:image/png," + "x", "must be base64"),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a broken").decode(), "not a PNG, JPEG, WEBP, GIF image"),
        (str(tmp_path / "missing.png"), "cannot be read"),
    ]:
        with pytest.raises(RequestRejected, match=problem) as refused:
            with_images_resolved(conversation(url), trusted)
        assert refused.value.code == "invalid_image"


def test_a_text_only_model_refuses_image_rows_with_unsupported_content():
    from types import SimpleNamespace

    from nightshift.wire.openai_format import prepare_request

    text_model = SimpleNamespace(is_multimodal_model=False)
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    request = {"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": content}]}}
    with pytest.raises(RequestRejected) as refused:
        prepare_request(0, "r", request, ServedModels("tiny", frozenset({"tiny"})), {}, 512, "generate", text_model)
    assert refused.value.code == "unsupported_content" and "vision-language model" in str(refused.value)


def test_a_corpus_image_column_of_bytes_or_paths_becomes_an_image_part():
    from nightshift.config import CorpusOptions
    from nightshift.inputs import corpus_row

    options = CorpusOptions(image_column="scan", template="Describe: {text}")
    with_bytes = json.loads(corpus_row(1, None, "a receipt", options, b"\x89PNG...").request_json)
    content = with_bytes["body"]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "Describe: a receipt"}
    assert content[1]["image_url"]["url"].startswith("data:image/*;base64,")
    with_path = json.loads(corpus_row(2, None, "a form", options, "s3://scans/form.jpg").request_json)
    assert with_path["body"]["messages"][0]["content"][1]["image_url"]["url"] == "s3://scans/form.jpg"
    without = json.loads(corpus_row(3, None, "no scan", options, None).request_json)
    assert without["body"]["messages"][0]["content"] == "Describe: no scan"


def test_a_parquet_corpus_with_an_image_column_of_bytes_reads_each_record_with_its_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nightshift.config import CorpusOptions
    from nightshift.inputs import read_rows

    table = pa.table({"id": ["a", "b"], "text": ["a receipt", "no scan"], "scan": pa.array([b"\x89PNG-a", None])})
    pq.write_table(table, tmp_path / "scans.parquet")
    options = CorpusOptions(id_column="id", image_column="scan")
    rows = [json.loads(row.request_json) for row in read_rows(str(tmp_path / "scans.parquet"), "corpus", options)]
    first, second = (row["body"]["messages"][-1]["content"] for row in rows)
    assert first[1]["image_url"]["url"].endswith(base64.b64encode(b"\x89PNG-a").decode())
    assert second == "no scan"


def test_only_rows_whose_images_are_inline_share_answers_or_reach_the_result_cache(tmp_path):
    import io

    from PIL import Image

    from nightshift.wire.media import MediaPolicy
    from nightshift.wire.openai_format import duplicate_key, prepare_request

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    (tmp_path / "scan.png").write_bytes(buffer.getvalue())
    inline = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def key(url):
        content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
        request = {"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": content}],
                                                           "temperature": 0}}  # fmt: skip
        served = ServedModels("m", frozenset({"m"}))
        return duplicate_key(
            request, prepare_request(0, "r", request, served, {}, 512, media=MediaPolicy(trusted=True))
        )

    assert key(inline) is not None
    assert key(str(tmp_path / "scan.png")) is None  # the file may be replaced under its name tomorrow
