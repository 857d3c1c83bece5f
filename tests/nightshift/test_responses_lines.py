"""/v1/responses batch lines: asked as the chat completion that asks the same, answered as a
Response object the official client's model reads; what chat cannot ask is the row's error."""

import json

import orjson
import pytest
from openai.types.responses import Response

from nightshift.inputs import parse_batch_line
from nightshift.wire.responses import response_body

pytestmark = pytest.mark.fast
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "weather", "description": "Weather in a city", "parameters": CITY}


def line(body: dict, custom_id: str = "r1") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body})


def test_a_responses_line_is_read_as_the_chat_request_that_asks_the_same():
    body = {
        "model": "tiny", "instructions": "Answer in French.", "max_output_tokens": 32, "temperature": 0,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"role": "developer", "content": "Be brief."},
        ],
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
        "metadata": {"team": "ops"},
    }  # fmt: skip
    row = parse_batch_line(line(body), 1)

    assert row.error is None
    request = row.request
    assert request["url"] == "/v1/chat/completions"
    assert request["body"] == {
        "model": "tiny", "temperature": 0, "max_tokens": 32,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "system", "content": "Be brief."},
        ],
        "tools": [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
    }  # fmt: skip
    assert request["responses"]["instructions"] == "Answer in French." and request["responses"]["tools"] == [WEATHER]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "unsupported_parameter"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "unsupported_parameter"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "unsupported_parameter"),
        ({"input": "hi", "stream": True}, "unsupported_parameter"),
        ({"input": [{"type": "file_search_call"}]}, "unsupported_parameter"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "unsupported_parameter"),
        ({"input": []}, "missing_input"),
        ({"instructions": "no input"}, "missing_input"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "invalid_request"),
        # hostile shapes: the row's error, never the run's crash
        ({"input": "hi", "text": "json"}, "invalid_request"),
        ({"input": "hi", "text": {"format": "json"}}, "invalid_request"),
        ({"input": "hi", "tools": 5}, "invalid_request"),
    ],
)
def test_what_chat_cannot_ask_is_the_rows_error_with_openais_code(body, code):
    row = parse_batch_line(line(body), 7)
    assert row.request is None and row.error["code"] == code and row.error["line"] == 7
    assert row.custom_id == "r1", "the error line names its row"


def test_the_answer_is_a_response_object_the_official_client_reads():
    chat = {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1767225600, "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.",
            "tool_calls": [{"id": "call_9", "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
                  "prompt_tokens_details": {"cached_tokens": 32}},
    }  # fmt: skip
    body = response_body(chat, {"instructions": "Be brief.", "tools": [WEATHER]}, "abc")

    response = Response.model_validate(body)
    assert response.output_text == "Checking." and response.status == "completed"
    assert response.id == "resp_abc" and response.instructions == "Be brief." and response.model == "tiny"
    [message, call] = response.output
    assert (call.type, call.call_id, call.name, json.loads(call.arguments)) == (
        "function_call", "call_9", "weather", {"city": "Oslo"}
    )  # fmt: skip
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (40, 12, 52)
    assert usage.input_tokens_details.cached_tokens == 32 and usage.output_tokens_details.reasoning_tokens == 0

    short = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "Che"}}
    cut = Response.model_validate(response_body({**chat, "choices": [short]}, {}, "abc"))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
