"""Specification: every output and error line Nightshift writes is one that the wire format's
own models accept — vLLM's `run_batch` line (`BatchRequestOutput`) and the official `openai`
client's response types."""

import json

import pytest

pytestmark = pytest.mark.fast

CACHE_KEY = "job-fingerprint"


def engine_output(logprobs: bool = False):
    """A finished vLLM RequestOutput with two choices, as the engine hands one back."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    def choice(index: int, text: str, token_ids: list[int]) -> CompletionOutput:
        positions = [{t: Logprob(-0.1, rank=1, decoded_token=f"t{t}"), 7: Logprob(-2.5, rank=2)} for t in token_ids]
        return CompletionOutput(index, text, token_ids, None, positions if logprobs else None, finish_reason="length")

    output = RequestOutput("1", "Hi", [1, 2, 3], None, [choice(0, "Hello there", [4, 5]), choice(1, "Hey", [6])], True)
    output.num_cached_tokens = 2  # of its 3 prompt tokens, served by the prefix cache
    return output


def parsed_by_run_batch(line: dict):
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    return BatchRequestOutput.model_validate_json(json.dumps(line))  # as it is written: JSON


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_chat_line_is_a_run_batch_line_holding_an_openai_chat_completion(logprobs):
    from openai.types.chat import ChatCompletion

    from nightshift.wire.openai_format import output_line

    line = output_line("row-1", "chat", engine_output(logprobs), "tiny", CACHE_KEY).wire()
    assert parsed_by_run_batch(line).custom_id == "row-1"
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert [c.message.content for c in completion.choices] == ["Hello there", "Hey"]
    assert completion.usage.completion_tokens == 3 and completion.usage.prompt_tokens == 3
    assert completion.usage.prompt_tokens_details.cached_tokens == 2, "the engine's own count, as OpenAI words it"
    if logprobs:
        assert [t.token for t in completion.choices[0].logprobs.content] == ["t4", "t5"]


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_completion_line_is_a_run_batch_line_holding_an_openai_completion(logprobs):
    from openai.types import Completion
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    from nightshift.wire.openai_format import output_line

    line = output_line("row-2", "completion", engine_output(logprobs), "tiny", CACHE_KEY).wire()
    # run_batch serves no /v1/completions: its envelope, and the body as vLLM's server answers it
    parsed_by_run_batch({**line, "response": {**line["response"], "body": None}})
    CompletionResponse.model_validate(line["response"]["body"])
    completion = Completion.model_validate(line["response"]["body"])
    assert [c.text for c in completion.choices] == ["Hello there", "Hey"]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_an_embedding_line_is_a_run_batch_line_holding_an_openai_embedding_list(encoding_format):
    from openai.types import CreateEmbeddingResponse

    from nightshift.wire.openai_format import embedding_output_line

    line = embedding_output_line("doc-1", [[0.5, -0.25], [1.0, 0.0]], 7, encoding_format, "minilm", CACHE_KEY).wire()
    parsed_by_run_batch(line)
    if encoding_format == "float":  # the client's type holds floats; base64 is a string it decodes itself
        response = CreateEmbeddingResponse.model_validate(line["response"]["body"])
        assert [d.embedding for d in response.data] == [[0.5, -0.25], [1.0, 0.0]]


def test_an_error_line_is_a_run_batch_line_with_no_response():
    from nightshift.wire.openai_format import error_line

    line = error_line("row-3", {"code": "invalid_json", "message": "line 3 is not JSON", "line": 3}, CACHE_KEY).wire()
    parsed = parsed_by_run_batch(line)
    assert parsed.response is None and parsed.error["code"] == "invalid_json"
